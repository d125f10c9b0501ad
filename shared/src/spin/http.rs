//! The outbound HTTP port on Spin.

use spin_sdk::wit::wasi::http0_2_0::{outgoing_handler, types as wasi_http};

use crate::http::{HttpClient, HttpError, HttpRequest, HttpResponse, Method};

/// The largest response body read (a receiver cannot run an instance out of memory).
const MAX_RESPONSE_BYTES: usize = 8 << 20;

/// Outbound HTTP through `wasi:http/outgoing-handler`, blocking, with timeouts on every call:
/// to connect, to the first byte, between bytes, and in all (three times the timeout), so a
/// peer that trickles its answer cannot hold an instance.
pub struct SpinHttp;

impl HttpClient for SpinHttp {
    fn send(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let started = std::time::Instant::now();
        let (scheme, rest) = request
            .url
            .split_once("://")
            .ok_or_else(|| HttpError::Refused(format!("not an absolute URL: {}", request.url)))?;
        let (authority, path) = rest.find('/').map_or((rest, "/"), |i| (&rest[..i], &rest[i..]));
        let entries: Vec<(String, Vec<u8>)> =
            request.headers.iter().map(|(k, v)| (k.clone(), v.as_bytes().to_vec())).collect();
        let headers =
            wasi_http::Fields::from_list(&entries).map_err(|e| HttpError::Refused(format!("bad header: {e:?}")))?;
        let outgoing = wasi_http::OutgoingRequest::new(headers);
        let method = match request.method {
            Method::Get => wasi_http::Method::Get,
            Method::Put => wasi_http::Method::Put,
            Method::Post => wasi_http::Method::Post,
            Method::Delete => wasi_http::Method::Delete,
        };
        let scheme = if scheme == "http" { wasi_http::Scheme::Http } else { wasi_http::Scheme::Https };
        let set = outgoing
            .set_method(&method)
            .and(outgoing.set_scheme(Some(&scheme)))
            .and(outgoing.set_authority(Some(authority)))
            .and(outgoing.set_path_with_query(Some(path)));
        set.map_err(|()| HttpError::Refused(format!("invalid URL: {}", request.url)))?;
        let body = outgoing.body().map_err(|()| HttpError::Refused("body already taken".into()))?;
        {
            let stream = body.write().map_err(|()| HttpError::Refused("body not writable".into()))?;
            for chunk in request.body.chunks(4096) {
                stream
                    .blocking_write_and_flush(chunk)
                    .map_err(|e| HttpError::Connection(format!("writing body: {e:?}")))?;
            }
        }
        wasi_http::OutgoingBody::finish(body, None).map_err(|e| HttpError::Connection(format!("{e:?}")))?;

        let nanos = u64::try_from(request.timeout.as_nanos()).unwrap_or(u64::MAX);
        let options = wasi_http::RequestOptions::new();
        // Hosts may not support every timeout; an unsupported one is not an error.
        let _ = options.set_connect_timeout(Some(nanos));
        let _ = options.set_first_byte_timeout(Some(nanos));
        let _ = options.set_between_bytes_timeout(Some(nanos));
        let future = outgoing_handler::handle(outgoing, Some(options)).map_err(map_error_code)?;
        future.subscribe().block();
        let response = match future.get() {
            Some(Ok(Ok(response))) => response,
            Some(Ok(Err(code))) => return Err(map_error_code(code)),
            Some(Err(())) | None => return Err(HttpError::Connection("response already taken".into())),
        };
        let status = response.status();
        let headers = response
            .headers()
            .entries()
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), String::from_utf8_lossy(&v).into_owned()))
            .collect();
        let incoming = response.consume().map_err(|()| HttpError::Connection("response body already taken".into()))?;
        let stream = incoming.stream().map_err(|()| HttpError::Connection("response body not readable".into()))?;
        let mut body = Vec::new();
        loop {
            if started.elapsed() > request.timeout * 3 {
                return Err(HttpError::Timeout);
            }
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) if body.len() + chunk.len() > MAX_RESPONSE_BYTES => {
                    return Err(HttpError::Connection(format!("the answer is over {MAX_RESPONSE_BYTES} bytes")));
                }
                Ok(chunk) => body.extend_from_slice(&chunk),
                Err(wasi::io::streams::StreamError::Closed) => break,
                Err(e) => return Err(HttpError::Connection(format!("reading body: {e:?}"))),
            }
        }
        Ok(HttpResponse { status, headers, body })
    }
}

fn map_error_code(code: wasi_http::ErrorCode) -> HttpError {
    match code {
        wasi_http::ErrorCode::ConnectionTimeout
        | wasi_http::ErrorCode::ConnectionReadTimeout
        | wasi_http::ErrorCode::ConnectionWriteTimeout => HttpError::Timeout,
        wasi_http::ErrorCode::HttpRequestDenied => {
            HttpError::Refused("the host does not allow this destination (allowed_outbound_hosts)".into())
        }
        other => HttpError::Connection(format!("{other:?}")),
    }
}
