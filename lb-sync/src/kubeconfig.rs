//! How ringlb finds its API server, as `kubectl` does: an explicit `--kubeconfig`, else the
//! `KUBECONFIG` variable, else `~/.kube/config`, else the in-cluster ServiceAccount (token and CA
//! mounted into the pod, `KUBERNETES_SERVICE_HOST`). kube-rs implements each of these; what a
//! kubeconfig may say (token, client certificate, embedded or file CA, `insecure-skip-tls-verify`,
//! exec plugins) is its support.

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};

/// Why no client could be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading kubeconfig {path}: {source}")]
    Read { path: String, source: kube::config::KubeconfigError },
    #[error("kubeconfig {path}: {source}")]
    Config { path: String, source: kube::config::KubeconfigError },
    #[error(
        "no Kubernetes configuration found (no --kubeconfig, KUBECONFIG, ~/.kube/config, or in-cluster ServiceAccount): {0}"
    )]
    Infer(kube::config::InferConfigError),
    #[error("creating the Kubernetes client: {0}")]
    Client(kube::Error),
}

/// A client configuration from `kubeconfig` if given, else by the usual rules (module doc).
pub async fn config(kubeconfig: Option<&Path>) -> Result<kube::Config, ClientError> {
    match kubeconfig {
        Some(path) => {
            let shown = path.display().to_string();
            let file = Kubeconfig::read_from(path)
                .map_err(|source| ClientError::Read { path: shown.clone(), source })?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|source| ClientError::Config { path: shown, source })
        }
        None => kube::Config::infer().await.map_err(ClientError::Infer),
    }
}

/// A client from [`config`]; must run inside a tokio runtime.
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, ClientError> {
    let config = config(kubeconfig).await?;
    kube::Client::try_from(config).map_err(ClientError::Client)
}
