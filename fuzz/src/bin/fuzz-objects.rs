//! AFL++ entry point of the `objects` target (see `ringlb_fuzz::objects`); built by `cargo afl build` only.

fn main() {
    afl::fuzz!(|data: &[u8]| ringlb_fuzz::objects::run(data));
}
