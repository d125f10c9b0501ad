//! The key-value port on Redis, through Spin's outbound Redis interface
//! (`fermyon:spin/redis@2.0.0`) rather than Spin's `type = "redis"` key-value backend, whose
//! compare-and-swap reports every swap as failed (and a lost race as success).
//!
//! A compare-and-swap is one Lua script: Redis runs a script as one atomic step, so the
//! comparison and the write cannot interleave with another client, also when the key is
//! absent. It costs one round trip (the key-value interface needs two: `current`, `swap`).
//! Reads of several keys are one script too, whose answer says which keys are absent in a way
//! that survives every Spin version's flattening of Redis replies (older hosts drop `nil`s).

use spin_sdk::redis::{Connection, RedisParameter, RedisResult};

use crate::store::{KvStore, StoreError};

/// `KEYS[1]`, `ARGV[1]` `1` when a value is expected (`ARGV[2]`), `0` when the key must be
/// absent; writes `ARGV[3]` and answers 1 only when the key held what was expected.
const SWAP: &str = "local current = redis.call('GET', KEYS[1]) \
    if ARGV[1] == '1' then if current ~= ARGV[2] then return 0 end \
    elseif current then return 0 end \
    redis.call('SET', KEYS[1], ARGV[3]) return 1";

/// Each key's value with `+` in front, or `-` for an absent key, in the order of `KEYS`.
const GET_MANY: &str = "local out = {} for i, key in ipairs(KEYS) do \
    local value = redis.call('GET', key) \
    if value then out[i] = '+' .. value else out[i] = '-' end end return out";

/// A connection to the Redis server of `redis_url`, opened once per invocation.
pub struct RedisStore {
    connection: Connection,
}

impl RedisStore {
    /// Connects; the address must be in the component's `allowed_outbound_hosts`.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let connection = Connection::open(url).map_err(|e| match e {
            spin_sdk::redis::Error::InvalidAddress => StoreError::Backend(
                "redis_url is not a Redis address this component may reach: redis_host must name its scheme, host and port"
                    .into(),
            ),
            other => backend(other),
        })?;
        Ok(Self { connection })
    }

    fn eval(&self, script: &str, keys: &[&str], args: Vec<RedisParameter>) -> Result<Vec<RedisResult>, StoreError> {
        let mut arguments = Vec::with_capacity(2 + keys.len() + args.len());
        arguments.push(RedisParameter::Binary(script.as_bytes().to_vec()));
        arguments.push(RedisParameter::Int64(keys.len() as i64));
        arguments.extend(keys.iter().map(|k| RedisParameter::Binary(k.as_bytes().to_vec())));
        arguments.extend(args);
        self.connection.execute("EVAL", &arguments).map_err(backend)
    }
}

fn backend(error: spin_sdk::redis::Error) -> StoreError {
    StoreError::Backend(format!("redis: {error}"))
}

fn unexpected(what: &str, answer: &[RedisResult]) -> StoreError {
    StoreError::Backend(format!("redis: unexpected answer to {what}: {} values", answer.len()))
}

/// One value of the [`GET_MANY`] script.
fn tagged(result: RedisResult) -> Result<Option<Vec<u8>>, StoreError> {
    match result {
        RedisResult::Binary(mut bytes) if bytes.first() == Some(&b'+') => {
            bytes.remove(0);
            Ok(Some(bytes))
        }
        RedisResult::Binary(bytes) if bytes == b"-" => Ok(None),
        RedisResult::Status(text) if text == "-" => Ok(None),
        _ => Err(StoreError::Backend("redis: unexpected value in a batch read".into())),
    }
}

impl KvStore for RedisStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.connection.get(key).map_err(backend)
    }

    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.connection.set(key, value).map_err(backend)
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.connection.del(&[key.to_owned()]).map(drop).map_err(backend)
    }

    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, value: &[u8]) -> Result<bool, StoreError> {
        let (mode, expected) = match expected {
            Some(bytes) => ("1", bytes.to_vec()),
            None => ("0", Vec::new()),
        };
        let args = vec![
            RedisParameter::Binary(mode.as_bytes().to_vec()),
            RedisParameter::Binary(expected),
            RedisParameter::Binary(value.to_vec()),
        ];
        match self.eval(SWAP, &[key], args)?.as_slice() {
            [RedisResult::Int64(1)] => Ok(true),
            [RedisResult::Int64(0)] => Ok(false),
            other => Err(unexpected("a compare-and-swap", other)),
        }
    }

    fn increment(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        if delta == 0 {
            // Reading a counter leaves no key behind.
            return match self.get(key)? {
                None => Ok(0),
                Some(bytes) => std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(|t| t.parse().ok())
                    .ok_or_else(|| StoreError::Corrupt { key: key.to_owned(), reason: "not a counter".into() }),
            };
        }
        let args = [RedisParameter::Binary(key.as_bytes().to_vec()), RedisParameter::Int64(delta)];
        match self.connection.execute("INCRBY", &args).map_err(backend)?.as_slice() {
            [RedisResult::Int64(sum)] => Ok(*sum),
            other => Err(unexpected("INCRBY", other)),
        }
    }

    fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let answer = self.eval(GET_MANY, &keys, Vec::new())?;
        if answer.len() != keys.len() {
            return Err(unexpected("a batch read", &answer));
        }
        answer.into_iter().map(tagged).collect()
    }

    fn set_many(&self, entries: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let args: Vec<RedisParameter> = entries
            .iter()
            .flat_map(|(key, value)| {
                [RedisParameter::Binary(key.as_bytes().to_vec()), RedisParameter::Binary(value.clone())]
            })
            .collect();
        self.connection.execute("MSET", &args).map(drop).map_err(backend)
    }

    fn delete_many(&self, keys: &[String]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        self.connection.del(keys).map(drop).map_err(backend)
    }
}
