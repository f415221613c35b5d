"""Token-level constants shared by the data pipeline and the models.

The values follow LLaVA / TinyLLaVA Factory so that datasets, checkpoints and
label tensors produced by either code base mean the same thing here.
"""

# Stands in for an image inside `input_ids` before the model splices in the
# connector output. Negative so it can never collide with a real vocabulary id.
IMAGE_TOKEN_INDEX: int = -200

# Label value ignored by the loss (matches torch.nn.CrossEntropyLoss' default,
# which the reference training code relies on).
IGNORE_INDEX: int = -100

# The literal tag that marks where an image goes in a LLaVA conversation.
IMAGE_PLACEHOLDER: str = "<image>"
