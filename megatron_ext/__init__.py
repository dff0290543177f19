"""Everything that touches megatron-core. Nothing outside this package imports megatron."""
