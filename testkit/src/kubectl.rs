//! `kubectl` (v1.32, on every machine of this kind) as a test's operator: it drives the emulator
//! (or any server a kubeconfig names) the way a person would, with its own kubeconfig in a
//! temporary directory that lives as long as the value.

use std::process::Command;

use serde_json::Value;

use crate::apiserver::ApiServer;

/// A kubectl bound to one server and user.
pub struct Kubectl {
    kubeconfig: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Kubectl {
    /// As the emulator's administrator (`system:masters`).
    pub fn for_server(server: &ApiServer) -> Kubectl {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let kubeconfig = server.write_kubeconfig(&dir.path().join("kubeconfig"));
        Kubectl { kubeconfig, _dir: dir }
    }

    /// As whoever `token` authenticates.
    pub fn with_token(server: &ApiServer, token: &str) -> Kubectl {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let kubeconfig =
            server.write_kubeconfig_with(&dir.path().join("kubeconfig"), serde_json::json!({"token": token}));
        Kubectl { kubeconfig, _dir: dir }
    }

    /// Runs kubectl; its (status, stdout, stderr).
    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        let mut command = Command::new("kubectl");
        command.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        command
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = command.spawn().expect("kubectl is installed");
        if let Some(input) = stdin {
            use std::io::Write as _;
            child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write stdin");
        }
        drop(child.stdin.take());
        let output = child.wait_with_output().expect("kubectl ran");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Runs kubectl; its stdout, or a panic with its stderr.
    pub fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let (ok, out, err) = self.run(args, stdin);
        assert!(ok, "kubectl {args:?} failed: {err}");
        out
    }

    /// Runs kubectl with `-o json`; the parsed output.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&all, None)).expect("kubectl prints JSON")
    }
}

impl Kubectl {
    /// `kubectl apply -f -` with `yaml`; panics with kubectl's error if it fails.
    pub fn apply(&self, yaml: &str) -> String {
        self.ok(&["apply", "-f", "-"], Some(yaml))
    }

    /// The kubeconfig this kubectl uses (for other clients of the same server and user).
    pub fn kubeconfig(&self) -> &std::path::Path {
        &self.kubeconfig
    }
}
