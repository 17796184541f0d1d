//! AFL++ entry point of the `manifest` target (see `ringlb_fuzz::manifest`); built by `cargo afl build` only.

fn main() {
    afl::fuzz!(|data: &[u8]| ringlb_fuzz::manifest::run(data));
}
