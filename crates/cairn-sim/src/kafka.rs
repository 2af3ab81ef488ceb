//! A Kafka-protocol broker for tests: nisshi 0.7.0 (`../shared/tools`, unpacked and checked once by
//! `scripts/install-test-tools.sh` into `~/.cache/cairn-test-tools/nisshi`), with SQLite storage in
//! a temporary directory, listening on 127.0.0.1 on a free port; killed and deleted on drop.

use std::process::{Child, Command, Stdio};

/// A running broker.
pub struct KafkaBroker {
    child: std::sync::Mutex<Child>,
    dir: std::path::PathBuf,
    port: u16,
    /// `127.0.0.1:PORT`
    pub bootstrap: String,
}

impl KafkaBroker {
    /// Starts the broker; panics with instructions if nisshi is not installed.
    pub fn start() -> Self {
        let port = crate::tools::free_port();
        let dir = std::env::temp_dir().join(format!("cairn-nisshi-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("broker directory");
        let child = Self::spawn(&dir, port);
        Self { child: std::sync::Mutex::new(child), dir, port, bootstrap: format!("127.0.0.1:{port}") }
    }

    fn spawn(dir: &std::path::Path, port: u16) -> Child {
        let bin = crate::tools::installed("nisshi", "the nisshi broker from ../shared/tools");
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(bin)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://nisshi.db", "--group-initial-rebalance-delay", "0s"])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nisshi");
        crate::tools::wait_listening(port, "nisshi");
        child
    }

    /// Kills the broker with SIGKILL; its data stays for [`KafkaBroker::restart`].
    pub fn crash(&self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the broker again on the same port and data after [`KafkaBroker::crash`].
    pub fn restart(&self) {
        *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Self::spawn(&self.dir, self.port);
    }

    /// Client settings for this broker (IPv4 only: it listens on 127.0.0.1).
    pub fn client_config(&self) -> rdkafka::ClientConfig {
        let mut cfg = rdkafka::ClientConfig::new();
        cfg.set("bootstrap.servers", &self.bootstrap).set("broker.address.family", "v4");
        cfg
    }

    /// Creates a topic (replication 1); panics if the broker refuses.
    pub fn create_topic(&self, name: &str, partitions: i32) {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            self.client_config().create().expect("admin client");
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let r = futures::executor::block_on(admin.create_topics([&topic], &AdminOptions::new()))
            .expect("CreateTopics");
        assert!(r.iter().all(|x| x.is_ok()), "creating topic {name}: {r:?}");
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.crash();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
