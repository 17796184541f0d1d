//! AFL++ entry point of the `annotations` target (see `ringlb_fuzz::annotations`); built by `cargo afl build` only.

fn main() {
    afl::fuzz!(|data: &[u8]| ringlb_fuzz::annotations::run(data));
}
