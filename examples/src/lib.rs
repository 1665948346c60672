//! # xatastor-examples
//!
//! The `xatastor-target` server binary and small programs showing how to embed the Xatastor crates.
//!
//! **Status: not yet implemented.** The binary arrives with the server and catalog issues; until then
//! this package holds only this description.
