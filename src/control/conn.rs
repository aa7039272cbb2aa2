//! One client connection: check the peer, then read requests and write
//! replies in order until the client hangs up or calls `watch`.

use std::io;
use std::sync::Arc;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::task::JoinError;

use super::auth::Peer;
use super::line::{Line, LineReader};
use super::progress::Reporter;
use super::protocol::{
    error_line, event_line, parse_request, progress_line, result_line, ApiError, Call, ErrorCode,
    Request, Response, Shape, VersionInfo, Watching, MAX_LINE, PROTOCOL_VERSION,
};
use super::server::Shared;

pub(crate) async fn serve(stream: UnixStream, shared: Arc<Shared>) {
    let verdict = stream
        .peer_cred()
        .map_err(super::auth::AuthError::NoCredentials)
        .and_then(|c| {
            shared.auth.check(&Peer {
                uid: c.uid(),
                gid: c.gid(),
                pid: c.pid(),
            })
        });
    let (rd, mut wr) = stream.into_split();
    if let Err(e) = verdict {
        log::info!("control: refused a peer: {e}");
        let err = ApiError::new(ErrorCode::PermissionDenied, e.to_string());
        let _ = wr
            .write_all(error_line(&Value::Null, &err).as_bytes())
            .await;
        let _ = wr.shutdown().await;
        return;
    }
    if let Err(e) = requests(rd, &mut wr, &shared).await {
        log::debug!("control: connection ended: {e}");
    }
}

async fn requests(
    rd: impl AsyncRead + Unpin,
    wr: &mut OwnedWriteHalf,
    shared: &Shared,
) -> io::Result<()> {
    let mut lines = LineReader::new(BufReader::new(rd), MAX_LINE);
    while let Some(line) = lines.next().await? {
        let text = match line {
            Line::TooLong => {
                let e = ApiError::new(
                    ErrorCode::TooLarge,
                    format!("request line longer than {MAX_LINE} bytes"),
                );
                write(wr, &error_line(&Value::Null, &e)).await?;
                continue;
            }
            Line::Text(t) if t.iter().all(u8::is_ascii_whitespace) => continue,
            Line::Text(t) => t,
        };
        match parse_request(&text) {
            Err((id, e)) => write(wr, &error_line(&id, &e)).await?,
            Ok(Request {
                id,
                call: Call::Watch(_),
                ..
            }) => return watch(lines.into_inner(), wr, &id, shared).await,
            Ok(req) => answer(wr, req, shared).await?,
        }
    }
    Ok(())
}

async fn answer(wr: &mut OwnedWriteHalf, req: Request, shared: &Shared) -> io::Result<()> {
    let Request { id, progress, call } = req;
    let shape = Shape::of(&call);
    let method = call.method();
    let outcome = match call {
        Call::Version(_) => Ok(Response::Version(VersionInfo {
            protocol: PROTOCOL_VERSION,
            vdisk: env!("CARGO_PKG_VERSION").to_string(),
        })),
        Call::Stats(_) => {
            let service = shared.service.clone();
            tokio::task::spawn_blocking(move || service.metrics())
                .await
                .map(Response::Stats)
                .map_err(panicked)
        }
        call => run_call(wr, &id, progress, call, shared).await?,
    };
    let line = match outcome {
        Ok(r) if r.shape() == shape => result_line(&id, &r),
        Ok(r) => {
            log::error!(
                "control: the service answered {method} with {:?}",
                r.shape()
            );
            let e = ApiError::new(
                ErrorCode::Internal,
                format!("wrong result type for {method}"),
            );
            error_line(&id, &e)
        }
        Err(e) => error_line(&id, &e),
    };
    write(wr, &line).await
}

/// Runs a service call on a blocking thread, writing interim progress
/// lines if the client asked for them.
async fn run_call(
    wr: &mut OwnedWriteHalf,
    id: &Value,
    want_progress: bool,
    call: Call,
    shared: &Shared,
) -> io::Result<Result<Response, ApiError>> {
    let (reporter, mut progress) = Reporter::new(&call, shared.bus.clone());
    let service = shared.service.clone();
    let mut task = tokio::task::spawn_blocking(move || service.call(call, &|p| reporter.report(p)));
    let mut open = want_progress;
    loop {
        tokio::select! {
            done = &mut task => return Ok(done.unwrap_or_else(|e| Err(panicked(e)))),
            changed = progress.changed(), if open => match changed {
                Ok(()) => {
                    let p = *progress.borrow_and_update();
                    write(wr, &progress_line(id, &p)).await?;
                }
                // The reporter is gone: the call is returning.
                Err(_) => open = false,
            },
        }
    }
}

/// The rest of the connection is an event stream; input is read only to
/// notice the client hanging up.
async fn watch(
    mut rd: impl AsyncRead + Unpin,
    wr: &mut OwnedWriteHalf,
    id: &Value,
    shared: &Shared,
) -> io::Result<()> {
    // Subscribe before replying: every event after the reply reaches us.
    let mut events = shared.bus.subscribe();
    write(
        wr,
        &result_line(id, &Response::Watching(Watching { watching: true })),
    )
    .await?;
    let mut scratch = [0u8; 1024];
    loop {
        tokio::select! {
            n = rd.read(&mut scratch) => {
                if n? == 0 {
                    return Ok(());
                }
            }
            event = events.next() => match event {
                Some(event) => write(wr, &event_line(&event)).await?,
                None => return Ok(()),
            },
        }
    }
}

fn panicked(e: JoinError) -> ApiError {
    log::error!("control: a service call failed: {e}");
    ApiError::new(ErrorCode::Internal, "the call failed inside the daemon")
}

async fn write(wr: &mut OwnedWriteHalf, line: &str) -> io::Result<()> {
    wr.write_all(line.as_bytes()).await
}
