"""Finding and proving keystone neurons: activation probes, the paper's decoding, overlap, discovery, ablation."""
