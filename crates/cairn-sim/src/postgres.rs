//! A throwaway PostgreSQL cluster for tests: Debian's server binaries (installed by
//! `scripts/install-test-tools.sh` when missing), `initdb` into a temporary directory with trust
//! authentication, listening on 127.0.0.1 only on a free port; stopped and deleted on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running cluster.
pub struct PgServer {
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    /// The TCP port on 127.0.0.1.
    pub port: u16,
}

fn server_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).filter(|p| p.join("initdb").exists()).collect())
        .unwrap_or_default();
    found.sort();
    found.pop().expect("PostgreSQL server binaries are missing: run scripts/install-test-tools.sh (apt-get install postgresql)")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl PgServer {
    /// Creates and starts a cluster.
    pub fn start() -> Self {
        let bin = server_bin();
        let port = crate::tools::free_port();
        let dir = std::env::temp_dir().join(format!("cairn-pg-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the cluster directory");
        // PostgreSQL refuses to run as root; the Debian package's `postgres` user runs it then.
        let as_postgres = is_root();
        let server = Self { dir, bin, as_postgres, port };
        if as_postgres {
            let ok =
                Command::new("chown").arg("postgres").arg(&server.dir).status().is_ok_and(|s| s.success());
            assert!(ok, "cannot hand {} to the postgres user", server.dir.display());
        }
        let data = server.dir.join("data");
        let out = server
            .cmd("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        server.pg_start();
        server
    }

    fn pg_start(&self) {
        let opts = format!("-h 127.0.0.1 -p {} -k {} -c fsync=off", self.port, self.dir.display());
        let out = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-o", &opts, "-l"])
            .arg(self.dir.join("log"))
            .args(["-w", "start"])
            .output()
            .expect("run pg_ctl");
        assert!(out.status.success(), "PostgreSQL did not start: {}", String::from_utf8_lossy(&out.stderr));
        crate::tools::wait_listening(self.port, "PostgreSQL");
    }

    /// Stops the server the way a crash does (`pg_ctl -m immediate`): connections drop, and
    /// nothing answers on the port until [`PgServer::restart`].
    pub fn crash(&self) {
        let out = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output()
            .expect("run pg_ctl");
        assert!(out.status.success(), "PostgreSQL did not stop: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Starts the server again after [`PgServer::crash`] (crash recovery runs first).
    pub fn restart(&self) {
        self.pg_start();
    }

    fn cmd(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    /// A libpq connection string for the `postgres` database.
    pub fn conn(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }

    /// The cluster's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
