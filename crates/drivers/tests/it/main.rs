//! The drivers through the public API of the core: naming, permissions, drain, deletion,
//! replacement.

mod graph;
