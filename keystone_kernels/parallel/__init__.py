"""Several processes: DDP marks and the replica check, FSDP2 sharding, meta-device loading."""
