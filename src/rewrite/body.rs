//! The rewritten response body: decodes a compressed upstream body in bounded steps and runs
//! each decoded chunk through the [`LinkRewriter`].

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::base::body::BoxError;

use super::decode::{Decoder, Step};
use super::links::LinkRewriter;

pin_project! {
    /// A JSON body with upstream URLs rewritten on the fly.
    pub struct RewriteBody<B> {
        #[pin]
        pub(super) inner: B,
        pub(super) rewriter: LinkRewriter,
        // Owns the compressed input not yet decoded; each poll decodes one bounded step.
        pub(super) decoder: Option<Decoder>,
        pub(super) trailers: Option<HeaderMap>,
        pub(super) done: bool,
    }
}

impl<B> Body for RewriteBody<B>
where
    B: Body<Data = Bytes, Error = BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            if *this.done {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            if let Some(decoder) = this.decoder.as_mut() {
                match decoder.step() {
                    Ok(Step::Data(decoded)) => {
                        let out = this.rewriter.process(decoded, false);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                        continue;
                    }
                    Ok(Step::NeedInput) => {}
                    Ok(Step::End) => return finish(this.rewriter, this.done),
                    Err(error) => {
                        tracing::warn!(
                            reason = error.reason(),
                            route = &*this.rewriter.route.prefix,
                            error = %error,
                            "response aborted"
                        );
                        return Poll::Ready(Some(Err(error.into())));
                    }
                }
            }
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if let Some(decoder) = this.decoder.as_mut() {
                            decoder.push(data);
                            continue;
                        }
                        let out = this.rewriter.process(&data, false);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(frame) => {
                        *this.trailers = frame.into_trailers().ok();
                        match this.decoder.as_mut() {
                            Some(decoder) => decoder.end_input(),
                            None => return finish(this.rewriter, this.done),
                        }
                    }
                },
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => match this.decoder.as_mut() {
                    Some(decoder) => decoder.end_input(),
                    None => return finish(this.rewriter, this.done),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// The input is over and fully decoded: settles a URL the last chunk may have cut short.
pub(super) fn finish(
    rewriter: &mut LinkRewriter,
    done: &mut bool,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    *done = true;
    let out = rewriter.process(&[], true);
    if out.is_empty() {
        Poll::Ready(None)
    } else {
        Poll::Ready(Some(Ok(Frame::data(out))))
    }
}
