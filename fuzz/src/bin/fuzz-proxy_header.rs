//! AFL++ entry point of the `proxy_header` target (see `ringlb_fuzz::proxy_header`); built by `cargo afl build` only.

fn main() {
    afl::fuzz!(|data: &[u8]| ringlb_fuzz::proxy_header::run(data));
}
