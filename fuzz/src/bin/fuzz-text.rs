//! AFL++ entry point of the `text` target (see `ringlb_fuzz::text`); built by `cargo afl build` only.

fn main() {
    afl::fuzz!(|data: &[u8]| ringlb_fuzz::text::run(data));
}
