"""The client/server split: device sub-meshes, sharding rules, the partitioned step and the links."""
