//! A throwaway `redis-server` for tests: on a free loopback port, with its files in a
//! temporary directory, no persistence, stopped when dropped. Never the system's service.
//!
//! The components log in as the ACL user `portcullis`, with exactly the rules that
//! `deploy/spinkube/redis.yaml` gives it (a test holds the two together), so the tests prove
//! that those commands are all the store needs; the tests' own looks use the user `admin`.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The ACL rules of the `portcullis` user after its password: keys of any name, no channels,
/// and only the commands the outbound-Redis store sends (scripts run with the same rights).
pub const PORTCULLIS_RULES: [&str; 12] =
    ["~*", "resetchannels", "-@all", "+get", "+set", "+mset", "+del", "+incrby", "+eval", "+ping", "+hello", "+auth"];

const PASSWORD: &str = "portcullis-test-password";
const ADMIN_PASSWORD: &str = "admin-test-password";

/// A running `redis-server`.
pub struct RedisServer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts one and waits until it answers. Needs `redis-server` on `PATH` (Debian:
    /// `apt-get install redis-server`; `.ci/run` installs it).
    pub fn start() -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = std::env::temp_dir().join(format!("portcullis-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .args(["--user", "default", "off", "--user", "portcullis", "on", &format!(">{PASSWORD}")])
            .args(PORTCULLIS_RULES)
            .args(["--user", "admin", "on", &format!(">{ADMIN_PASSWORD}"), "~*", "&*", "+@all"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting redis-server: is it installed? (Debian: apt-get install redis-server)")?;
        let server = Self { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("redis-server did not listen on port {port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    /// `redis://portcullis:<password>@127.0.0.1:<port>`, for `redis_url`.
    pub fn url(&self) -> String {
        format!("redis://portcullis:{PASSWORD}@127.0.0.1:{}", self.port)
    }

    /// `redis://127.0.0.1:<port>`, for `redis_host` (`allowed_outbound_hosts`).
    pub fn host(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A connection as `admin`, for a test's own looks at the data.
    pub fn connect(&self) -> Result<redis::Connection> {
        Ok(redis::Client::open(format!("redis://admin:{ADMIN_PASSWORD}@127.0.0.1:{}", self.port))?.get_connection()?)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
