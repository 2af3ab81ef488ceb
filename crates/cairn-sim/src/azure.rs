//! A local Azure Blob server for tests: Azurite (from npm, installed once by
//! `scripts/install-test-tools.sh` under `~/.cache/cairn-test-tools/azurite`), started on
//! 127.0.0.1 on a free port with in-memory persistence and telemetry disabled, stopped when the
//! handle is dropped. Containers are created with the Azure SDK from the same npm install.

use std::process::{Child, Command, Stdio};

/// The well-known development account of the Azure storage emulators (public, not a secret).
const DEV_ACCOUNT: &str = "devstoreaccount1";
const DEV_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A running Azurite blob service.
pub struct AzuriteServer {
    child: Child,
    dir: std::path::PathBuf,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
}

impl AzuriteServer {
    /// Starts Azurite; panics with instructions if it is not installed.
    pub fn start() -> Self {
        let bin = crate::tools::installed("azurite/node_modules/.bin/azurite-blob", "Azurite from npm");
        let dir = crate::tools::tools_dir().join("azurite");
        let port = crate::tools::free_port();
        let child = Command::new(bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args(["--inMemoryPersistence", "--disableTelemetry", "--skipApiVersionCheck", "--silent"])
            // Azurite writes its debug log and account files into the working directory.
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start azurite-blob");
        let server = Self { child, dir, endpoint: format!("http://127.0.0.1:{port}") };
        crate::tools::wait_listening(port, "Azurite");
        server
    }

    /// The variables that point object_store at this emulator.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
            ("AZURITE_BLOB_STORAGE_URL", self.endpoint.clone()),
        ]
    }

    /// Sets [`Self::env`] in this process.
    pub fn set_env(&self) {
        for (k, v) in self.env() {
            std::env::set_var(k, v);
        }
    }

    /// Creates a container through the Azure SDK for JavaScript.
    pub fn create_container(&self, name: &str) {
        let conn = format!(
            "DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};BlobEndpoint={}/{DEV_ACCOUNT};",
            self.endpoint
        );
        let script = format!(
            "const {{ BlobServiceClient }} = require('@azure/storage-blob');\
             BlobServiceClient.fromConnectionString({conn:?}).getContainerClient({name:?}).create()\
             .then(() => process.exit(0), e => {{ console.error(e.message); process.exit(1); }});"
        );
        let out =
            Command::new("node").arg("-e").arg(script).current_dir(&self.dir).output().expect("run node");
        assert!(
            out.status.success(),
            "container {name} not created: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for AzuriteServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
