//! `fermyon:spin/redis@2.0.0`, Spin's outbound Redis interface, against a real Redis server:
//! an address outside the component's `allowed_outbound_hosts` is refused as Spin refuses it,
//! and replies are flattened into `redis-result`s as Spin 3+ does (arrays flattened, `nil`
//! kept, `OK` as a status).

use std::time::Duration;

use redis::{ConnectionAddr, Value};
use wasmtime::component::Resource;

use super::GuestState;
use super::spin_bindings::fermyon::spin::redis as wit;

/// An open connection inside a guest.
pub struct RedisHandle {
    connection: redis::Connection,
}

/// How long connecting and each command may take before the guest gets an error.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

fn other(error: impl std::fmt::Display) -> wit::Error {
    wit::Error::Other(error.to_string())
}

impl GuestState {
    fn redis(&mut self, connection: &Resource<RedisHandle>) -> Result<&mut redis::Connection, wit::Error> {
        Ok(&mut self.table.get_mut(connection).map_err(other)?.connection)
    }

    /// Counts a command for the invocation's figures, and among them the scripts that can
    /// write (the store's compare-and-swaps; its batch reads only read).
    fn count_redis(&mut self, command: &str, script: Option<&[u8]>) {
        self.kv.network_delay();
        self.redis_commands += 1;
        let writes = |s: &[u8]| s.windows(b"'SET'".len()).any(|w| w == b"'SET'");
        if command.eq_ignore_ascii_case("EVAL") && script.is_some_and(writes) {
            self.redis_scripts += 1;
        }
    }

    fn query<T: redis::FromRedisValue>(
        &mut self,
        connection: &Resource<RedisHandle>,
        command: redis::Cmd,
        name: &str,
    ) -> Result<T, wit::Error> {
        self.count_redis(name, None);
        let connection = self.redis(connection)?;
        command.query(connection).map_err(|e| match e.kind() {
            redis::ErrorKind::UnexpectedReturnType => wit::Error::TypeError,
            _ => other(e),
        })
    }
}

/// Spin's flattening of a reply into `redis-result`s.
fn flatten(value: Value, into: &mut Vec<wit::RedisResult>) -> Result<(), wit::Error> {
    match value {
        Value::Nil => into.push(wit::RedisResult::Nil),
        Value::Int(n) => into.push(wit::RedisResult::Int64(n)),
        Value::BulkString(bytes) => into.push(wit::RedisResult::Binary(bytes)),
        Value::SimpleString(text) => into.push(wit::RedisResult::Status(text)),
        Value::Okay => into.push(wit::RedisResult::Status("OK".into())),
        Value::Array(values) | Value::Set(values) => {
            for value in values {
                flatten(value, into)?;
            }
        }
        Value::Boolean(b) => into.push(wit::RedisResult::Int64(i64::from(b))),
        Value::Double(d) => into.push(wit::RedisResult::Binary(d.to_string().into_bytes())),
        Value::ServerError(e) => return Err(other(format!("{e:?}"))),
        other_value => return Err(other(format!("unsupported Redis reply: {other_value:?}"))),
    }
    Ok(())
}

impl wit::Host for GuestState {}

impl wit::HostConnection for GuestState {
    fn open(&mut self, address: String) -> Result<Resource<RedisHandle>, wit::Error> {
        let client = redis::Client::open(address.as_str()).map_err(|_| wit::Error::InvalidAddress)?;
        let (scheme, host, port) = match client.get_connection_info().addr() {
            ConnectionAddr::Tcp(host, port) => ("redis", host.clone(), *port),
            ConnectionAddr::TcpTls { host, port, .. } => ("rediss", host.clone(), *port),
            _ => return Err(wit::Error::InvalidAddress),
        };
        if !self.outbound.allowed.iter().any(|a| a.allows(scheme, &host, port)) {
            self.outbound.log.push(
                &self.outbound.component,
                &format!("Redis connection to {scheme}://{host}:{port} refused: not in allowed_outbound_hosts"),
            );
            return Err(wit::Error::InvalidAddress);
        }
        let connection = client.get_connection_with_timeout(REDIS_TIMEOUT).map_err(other)?;
        connection.set_read_timeout(Some(REDIS_TIMEOUT)).map_err(other)?;
        connection.set_write_timeout(Some(REDIS_TIMEOUT)).map_err(other)?;
        self.table.push(RedisHandle { connection }).map_err(|_| wit::Error::TooManyConnections)
    }

    fn publish(
        &mut self,
        connection: Resource<RedisHandle>,
        channel: String,
        payload: Vec<u8>,
    ) -> Result<(), wit::Error> {
        self.query::<Value>(&connection, redis::cmd("PUBLISH").arg(channel).arg(payload).clone(), "PUBLISH").map(drop)
    }

    fn get(&mut self, connection: Resource<RedisHandle>, key: String) -> Result<Option<Vec<u8>>, wit::Error> {
        self.query(&connection, redis::cmd("GET").arg(key).clone(), "GET")
    }

    fn set(&mut self, connection: Resource<RedisHandle>, key: String, value: Vec<u8>) -> Result<(), wit::Error> {
        self.query::<Value>(&connection, redis::cmd("SET").arg(key).arg(value).clone(), "SET").map(drop)
    }

    fn incr(&mut self, connection: Resource<RedisHandle>, key: String) -> Result<i64, wit::Error> {
        self.query(&connection, redis::cmd("INCR").arg(key).clone(), "INCR")
    }

    fn del(&mut self, connection: Resource<RedisHandle>, keys: Vec<String>) -> Result<u32, wit::Error> {
        self.query(&connection, redis::cmd("DEL").arg(keys).clone(), "DEL")
    }

    fn sadd(&mut self, connection: Resource<RedisHandle>, key: String, values: Vec<String>) -> Result<u32, wit::Error> {
        self.query(&connection, redis::cmd("SADD").arg(key).arg(values).clone(), "SADD")
    }

    fn smembers(&mut self, connection: Resource<RedisHandle>, key: String) -> Result<Vec<String>, wit::Error> {
        self.query(&connection, redis::cmd("SMEMBERS").arg(key).clone(), "SMEMBERS")
    }

    fn srem(&mut self, connection: Resource<RedisHandle>, key: String, values: Vec<String>) -> Result<u32, wit::Error> {
        self.query(&connection, redis::cmd("SREM").arg(key).arg(values).clone(), "SREM")
    }

    fn execute(
        &mut self,
        connection: Resource<RedisHandle>,
        command: String,
        arguments: Vec<wit::RedisParameter>,
    ) -> Result<Vec<wit::RedisResult>, wit::Error> {
        let script = match arguments.first() {
            Some(wit::RedisParameter::Binary(bytes)) => Some(bytes.clone()),
            _ => None,
        };
        self.count_redis(&command, script.as_deref());
        let mut cmd = redis::cmd(&command);
        for argument in arguments {
            match argument {
                wit::RedisParameter::Int64(n) => cmd.arg(n),
                wit::RedisParameter::Binary(bytes) => cmd.arg(bytes),
            };
        }
        let reply: Value = cmd.query(self.redis(&connection)?).map_err(other)?;
        let mut results = Vec::new();
        flatten(reply, &mut results)?;
        Ok(results)
    }

    fn drop(&mut self, connection: Resource<RedisHandle>) -> wasmtime::Result<()> {
        self.table.delete(connection)?;
        Ok(())
    }
}
