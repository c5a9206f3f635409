//! One upstream request shared by every identical request that arrives while it is in flight.
//!
//! A [`Flight`] holds the upstream answer as it arrives: the head, then the body's chunks, up
//! to `max_entry_bytes`. It is filled by a task of its own ([`Flight::fill`]), so a client that
//! leaves cancels nothing for the others. Each client reads it through a [`FlightBody`] from
//! the first chunk, at its own pace.
//!
//! Only whole answers are shared: a body whose `Content-Length` is within the cap streams to
//! every client as it arrives; a body of unknown length reaches the other clients once it has
//! ended within the cap. A body past the cap is handed to the client that started the request
//! (the owner) to stream directly, and the others make requests of their own: nobody receives
//! part of an answer. A body that fails midway fails for every client that reads it (an
//! aborted transfer, never a short complete one).

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use super::policy;
use crate::base::body::{BoxError, Direction, TimedBody, UpstreamBody};
use crate::base::headers;
use crate::error::ProxyError;

/// The upstream's response head, cleaned once for every client.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// Whether requests other than the owner's may receive this answer.
    pub shareable: bool,
    /// The body's length when the head announced it (0 for bodiless answers).
    pub length: Option<u64>,
    /// What the upstream answered the request that fetched it, for that request's access line.
    pub upstream: Option<crate::telemetry::request_id::UpstreamExchange>,
}

#[derive(Debug, Clone)]
enum End {
    Complete,
    Failed(Arc<str>),
    /// Past the cap: the owner streams the rest directly.
    Oversize,
}

#[derive(Default)]
struct FlightState {
    head: Option<Result<Arc<Head>, Arc<ProxyError>>>,
    chunks: Vec<Bytes>,
    len: usize,
    end: Option<End>,
    handoff: Option<TimedBody<UpstreamBody>>,
    wakers: Vec<Waker>,
    /// Filled from the shared store: the entry's age then, and when.
    stored: Option<(Duration, Instant)>,
    /// When the upstream request went out, if later than the flight began (its leader first
    /// waited for another replica's fill lock).
    sent_at: Option<Instant>,
}

impl FlightState {
    fn register(&mut self, waker: &Waker) {
        if !self.wakers.iter().any(|w| w.will_wake(waker)) {
            self.wakers.push(waker.clone());
        }
    }
}

/// One upstream request and what has arrived of its answer.
pub struct Flight {
    state: Mutex<FlightState>,
    cap: usize,
    /// When the flight began: the upstream request went out then or later
    /// ([`Flight::sent_at`]).
    began: Instant,
}

/// What a waiting request gets once the answer can be given to it.
pub enum Ready {
    Head(Arc<Head>),
    Failed(ProxyError),
    /// Not shareable after all: make a request of your own.
    Detached,
}

/// How a fill ended, for whoever decides whether to keep the answer.
pub enum Filled {
    /// A storable answer's whole body, as one buffer.
    Complete(Arc<Head>, Bytes),
    /// Not storable, failed, past the cap, or never answered: nothing to keep.
    Nothing,
}

impl Flight {
    pub fn new(cap: usize) -> Arc<Flight> {
        Arc::new(Flight {
            state: Mutex::new(FlightState::default()),
            cap,
            began: Instant::now(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, FlightState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut FlightState)) {
        let wakers = {
            let mut state = self.lock();
            change(&mut state);
            std::mem::take(&mut state.wakers)
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Sends the upstream's answer into the flight, to its end or the cap. `idle` bounds
    /// the pauses in the upstream body.
    pub async fn fill(
        &self,
        answer: Result<Response<UpstreamBody>, ProxyError>,
        idle: Duration,
    ) -> Filled {
        let response = match answer {
            Ok(response) => response,
            Err(error) => {
                let error = Arc::new(error);
                self.update(|state| state.head = Some(Err(error)));
                return Filled::Nothing;
            }
        };
        let (mut parts, body) = response.into_parts();
        headers::sanitize_response(&mut parts.headers);
        let length = if body.is_end_stream() {
            Some(0)
        } else {
            body.size_hint().exact()
        };
        let too_big = length.is_some_and(|l| l > self.cap as u64);
        let head = Arc::new(Head {
            status: parts.status,
            shareable: policy::shareable(&parts.headers) && !too_big,
            headers: parts.headers,
            length,
            upstream: parts.extensions.remove(),
        });
        let mut body = TimedBody::new(body, idle, Direction::Response, None);
        if too_big {
            self.update(|state| {
                state.head = Some(Ok(head));
                state.handoff = Some(body);
                state.end = Some(End::Oversize);
            });
            return Filled::Nothing;
        }
        self.update(|state| state.head = Some(Ok(head.clone())));
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        // Trailers end the body; Bitbucket sends none worth keeping.
                        break;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    let mut over = false;
                    self.update(|state| {
                        state.len += data.len();
                        state.chunks.push(data);
                        over = state.len > self.cap;
                    });
                    if over {
                        self.update(|state| {
                            state.handoff = Some(body);
                            state.end = Some(End::Oversize);
                        });
                        return Filled::Nothing;
                    }
                }
                Some(Err(error)) => {
                    let message: Arc<str> = crate::base::error_chain(&*error).into();
                    self.update(|state| state.end = Some(End::Failed(message)));
                    return Filled::Nothing;
                }
                None => break,
            }
        }
        if !policy::storable(head.status, &head.headers) {
            self.update(|state| state.end = Some(End::Complete));
            return Filled::Nothing;
        }
        let body = {
            let mut state = self.lock();
            let mut whole = bytes::BytesMut::with_capacity(state.len);
            state.chunks.iter().for_each(|c| whole.extend_from_slice(c));
            let whole = whole.freeze();
            // One buffer instead of many frames: what the store accounts is what is held.
            state.chunks = if whole.is_empty() {
                Vec::new()
            } else {
                vec![whole.clone()]
            };
            whole
        };
        self.update(|state| state.end = Some(End::Complete));
        Filled::Complete(head, body)
    }

    /// Whether the answer has ended (complete, failed, handed off past the cap, or every byte
    /// of a body of known length is in): nothing is in flight any more. The length counts
    /// because a client reads such a body to its end, and may send its next request, before
    /// the upstream's end of stream reaches the flight.
    pub fn ended(&self) -> bool {
        let state = self.lock();
        match &state.head {
            _ if state.end.is_some() => true,
            Some(Err(_)) => true,
            Some(Ok(head)) => head.length.is_some_and(|length| state.len as u64 >= length),
            None => false,
        }
    }

    /// When the upstream request went out: ages are counted from here, so no answer is
    /// reported younger than it is.
    pub fn sent_at(&self) -> Instant {
        self.lock().sent_at.unwrap_or(self.began)
    }

    /// The upstream request goes out now (after a wait that is no part of the answer's age).
    pub fn mark_sent(&self) {
        self.lock().sent_at = Some(Instant::now());
    }

    /// Fills the flight with an entry another replica stored, `age` old: no upstream request.
    pub fn fill_stored(&self, head: Arc<Head>, body: Bytes, age: Duration) {
        self.update(|state| {
            state.head = Some(Ok(head));
            state.len = body.len();
            if !body.is_empty() {
                state.chunks.push(body);
            }
            state.end = Some(End::Complete);
            state.stored = Some((age, Instant::now()));
        });
    }

    /// How old the answer is now, if it came from the shared store rather than upstream.
    pub fn stored_age(&self) -> Option<Duration> {
        self.lock()
            .stored
            .map(|(age, filled)| age + filled.elapsed())
    }

    /// Waits until the answer can be given to this request.
    pub async fn ready(&self, owner: bool) -> Ready {
        std::future::poll_fn(|cx| self.poll_ready(cx, owner)).await
    }

    fn poll_ready(&self, cx: &mut Context<'_>, owner: bool) -> Poll<Ready> {
        let mut state = self.lock();
        let head = match &state.head {
            None => {
                state.register(cx.waker());
                return Poll::Pending;
            }
            Some(Err(error)) => return Poll::Ready(Ready::Failed(replicate(error))),
            Some(Ok(head)) => head.clone(),
        };
        if owner {
            return Poll::Ready(Ready::Head(head));
        }
        if !head.shareable {
            return Poll::Ready(Ready::Detached);
        }
        if head.length.is_some() {
            return Poll::Ready(Ready::Head(head));
        }
        match state.end {
            None => {
                state.register(cx.waker());
                Poll::Pending
            }
            Some(End::Oversize) => Poll::Ready(Ready::Detached),
            Some(End::Complete) => Poll::Ready(Ready::Head(head)),
            // Nothing of it was given to this request yet: it gets the failure itself.
            Some(End::Failed(ref message)) => {
                Poll::Ready(Ready::Failed(ProxyError::UpstreamUnreachable(format!(
                    "the shared upstream answer failed midway: {message}"
                ))))
            }
        }
    }

    /// The body as one client reads it.
    pub fn body(self: &Arc<Self>, head: &Head, owner: bool) -> FlightBody {
        FlightBody {
            flight: self.clone(),
            offset: 0,
            owner,
            direct: None,
            done: head.length == Some(0),
        }
    }
}

/// A copy of a failure for each request that shared it.
fn replicate(error: &ProxyError) -> ProxyError {
    match error {
        ProxyError::UpstreamUnreachable(text) => ProxyError::UpstreamUnreachable(text.clone()),
        ProxyError::UpstreamTls(text) => ProxyError::UpstreamTls(text.clone()),
        ProxyError::UpstreamTimeout(text) => ProxyError::UpstreamTimeout(text.clone()),
        ProxyError::Token(token) => ProxyError::Token(crate::upstream::oauth::TokenError {
            credential: token.credential.clone(),
            token_url: token.token_url.clone(),
            detail: token.detail.clone(),
        }),
        other => ProxyError::UpstreamUnreachable(other.to_string()),
    }
}

/// One client's read of a flight's body.
pub struct FlightBody {
    flight: Arc<Flight>,
    /// Bytes of the body already given to this client.
    offset: usize,
    owner: bool,
    /// The owner's direct stream once the body went past the cap.
    direct: Option<TimedBody<UpstreamBody>>,
    done: bool,
}

impl Body for FlightBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(direct) = this.direct.as_mut() {
            let polled = Pin::new(direct).poll_frame(cx);
            if matches!(polled, Poll::Ready(None)) {
                this.done = true;
            }
            return polled;
        }
        if this.done {
            return Poll::Ready(None);
        }
        let mut state = this.flight.lock();
        // Chunks may have been merged into one buffer at the end: find the byte offset.
        let mut start = 0;
        for chunk in &state.chunks {
            let end = start + chunk.len();
            if this.offset < end {
                let piece = chunk.slice(this.offset - start..);
                this.offset = end;
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            start = end;
        }
        match state.end.clone() {
            None => {
                state.register(cx.waker());
                Poll::Pending
            }
            Some(End::Complete) => {
                this.done = true;
                Poll::Ready(None)
            }
            Some(End::Failed(message)) => {
                this.done = true;
                Poll::Ready(Some(Err(format!(
                    "the upstream body failed midway: {message}"
                )
                .into())))
            }
            Some(End::Oversize) => {
                let handoff = if this.owner {
                    state.handoff.take()
                } else {
                    None
                };
                drop(state);
                match handoff {
                    Some(direct) => {
                        this.direct = Some(direct);
                        self.poll_frame(cx)
                    }
                    None => {
                        this.done = true;
                        Poll::Ready(Some(Err("the shared upstream body went past \
                             cache.max_entry_bytes"
                            .into())))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
