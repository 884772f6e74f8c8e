"""The network: backbones cut into blocks, auxiliary heads, modules and the split."""
