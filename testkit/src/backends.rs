//! Loopback test backends.
