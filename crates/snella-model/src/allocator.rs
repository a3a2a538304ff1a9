//! The inter-layer allocator (spec §5).
