//! Randomized differential testing placeholder.
