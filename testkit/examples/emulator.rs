//! Runs the API server emulator until interrupted, writing a kubeconfig for it (for trying `kubectl`
//! against it by hand): `cargo run -p testkit --example emulator -- /tmp/kubeconfig`.

fn main() {
    let path = std::env::args().nth(1).unwrap_or_else(|| "kubeconfig".to_owned());
    let server = testkit::apiserver::ApiServer::start();
    server.write_kubeconfig(std::path::Path::new(&path));
    println!("emulator at {}; kubeconfig written to {path}", server.url());
    loop {
        std::thread::park();
    }
}
