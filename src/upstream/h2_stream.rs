//! One request as a stream of a lane's h2 connection ([`crate::upstream::lane`]): its body sent
//! as the upstream grants flow-control capacity, and the response head turned into the body
//! type the proxy streams. What hyper's `PipeToSendStream` and `Incoming` did, for the lanes,
//! which drive h2 directly.
//!
//! Uses [`crate::base::body`] and `h2`; knows nothing of lanes or routes.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::{Reason, SendStream};
use http::{Response, header};
use http_body::Body as _;

use crate::base::body::{BoxError, H2Body, UpstreamBody, UpstreamRequestBody};

type Body = UpstreamRequestBody;

/// The upstream's response with its body as the proxy streams it.
pub fn into_upstream_response(response: Response<h2::RecvStream>) -> Response<UpstreamBody> {
    let (parts, stream) = response.into_parts();
    // As hyper: the declared length (h2 checks the data against it), or none at all.
    let content_length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
        .or_else(|| stream.is_end_stream().then_some(0));
    Response::from_parts(
        parts,
        UpstreamBody::Lane {
            body: H2Body::new(stream, content_length),
        },
    )
}

/// Tells an upload whether its request still wants an answer: dropped before the response
/// head arrived (the request timed out, or its client left), its stream is reset rather than
/// fed the rest of a body nobody waits on.
pub struct Abandon(tokio::sync::oneshot::Sender<()>);

impl Abandon {
    /// A signal for the upload fed by `send_body`'s receiver.
    pub fn new() -> (Abandon, tokio::sync::oneshot::Receiver<()>) {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        (Abandon(sender), receiver)
    }

    /// The head arrived: the upload carries on for as long as its body does.
    pub fn answered(self) {
        let _ = self.0.send(());
    }
}

/// Streams a request body into its h2 stream, taking send capacity as the upstream grants it.
/// A body that fails (the client went away, stalled or broke its framing) resets the stream,
/// which the request's response future then reports as a reset the proxy sent; so does a
/// request abandoned before its answer.
pub async fn send_body(
    body: Body,
    mut stream: SendStream<Bytes>,
    abandoned: tokio::sync::oneshot::Receiver<()>,
) {
    let mut body = std::pin::pin!(body);
    let mut waiting: Option<(Bytes, bool)> = None;
    let mut abandoned = Some(abandoned);
    let sent = std::future::poll_fn(|cx| {
        if let Some(signal) = abandoned.as_mut()
            && let Poll::Ready(answered) = Pin::new(signal).poll(cx)
        {
            if answered.is_err() {
                return Poll::Ready(Err(BodyEnd::Abandoned));
            }
            abandoned = None;
        }
        poll_send_body(body.as_mut(), &mut stream, &mut waiting, cx)
    })
    .await;
    match sent {
        Ok(()) => {}
        Err(BodyEnd::Abandoned) => {
            tracing::debug!("request abandoned before its answer; resetting its stream");
            stream.send_reset(Reason::CANCEL);
        }
        Err(BodyEnd::Client(error)) => {
            tracing::debug!(error = %crate::base::error_chain(&*error), "request body failed; resetting its stream");
            stream.send_reset(Reason::CANCEL);
        }
        Err(BodyEnd::Upstream(error)) => {
            tracing::debug!(%error, "upstream stopped taking the request body");
        }
    }
}

/// Why a request body stopped before its end.
enum BodyEnd {
    Client(BoxError),
    /// The request was dropped before its response head.
    Abandoned,
    /// The stream was reset or its connection closed.
    Upstream(h2::Error),
}

/// One step of [`send_body`], as hyper's `PipeToSendStream`: a chunk waits in `waiting` until
/// the stream has capacity for it, and capacity is claimed only once a chunk is in hand (a
/// claim for a body that never produces data would pin the connection's window).
fn poll_send_body(
    mut body: Pin<&mut Body>,
    stream: &mut SendStream<Bytes>,
    waiting: &mut Option<(Bytes, bool)>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), BodyEnd>> {
    loop {
        // Registered while waiting for the body or for capacity, so a reset wakes this task.
        if let Poll::Ready(reason) = stream.poll_reset(cx) {
            let error = reason.map_or_else(|error| error, h2::Error::from);
            return Poll::Ready(Err(BodyEnd::Upstream(error)));
        }
        if let Some((_, end_of_stream)) = waiting {
            let end_of_stream = *end_of_stream;
            while stream.capacity() == 0 {
                match ready!(stream.poll_capacity(cx)) {
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return Poll::Ready(Err(BodyEnd::Upstream(error))),
                    None => {
                        return Poll::Ready(Err(BodyEnd::Upstream(h2::Error::from(
                            Reason::STREAM_CLOSED,
                        ))));
                    }
                }
            }
            let (chunk, _) = waiting.take().expect("checked above");
            stream
                .send_data(chunk, end_of_stream)
                .map_err(BodyEnd::Upstream)?;
            if end_of_stream {
                return Poll::Ready(Ok(()));
            }
            continue;
        }
        match ready!(body.as_mut().poll_frame(cx)) {
            // Request trailers never get here (`TimedBody` drops them); frames other than data
            // are extensions the upstream would not know.
            Some(Ok(frame)) => {
                if let Ok(chunk) = frame.into_data() {
                    let end_of_stream = body.is_end_stream();
                    if chunk.is_empty() {
                        stream
                            .send_data(chunk, end_of_stream)
                            .map_err(BodyEnd::Upstream)?;
                        if end_of_stream {
                            return Poll::Ready(Ok(()));
                        }
                    } else {
                        // A claim of one byte: h2 raises it to what `send_data` buffers.
                        stream.reserve_capacity(1);
                        *waiting = Some((chunk, end_of_stream));
                    }
                }
            }
            Some(Err(error)) => return Poll::Ready(Err(BodyEnd::Client(error))),
            None => {
                stream.reserve_capacity(0);
                return Poll::Ready(
                    stream
                        .send_data(Bytes::new(), true)
                        .map_err(BodyEnd::Upstream),
                );
            }
        }
    }
}
