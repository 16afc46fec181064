#![no_std]
// Only the `socklb` binary (src/main.rs) matters; this library target lets lb-userspace
// declare a build-dependency on this crate so cargo rebuilds the object when it changes.
