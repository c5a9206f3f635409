//! Bounded streaming decoders for the link rewriter: gzip, deflate (zlib) and brotli.
//!
//! A compressed body is attacker-shaped input: 816 bytes of brotli can decode to 1 GiB, and a
//! decoder that writes all it can per input slice turns that into gigabytes in memory at
//! once. Here every step decodes into one fixed buffer of [`DECODE_STEP`] bytes, so the rewriter
//! hands at most that much to the client per poll and memory stays flat whatever the body
//! expands to; and a body that expands past [`MAX_EXPANSION_RATIO`] times its compressed size
//! (once it has decoded more than [`EXPANSION_FLOOR`]) is refused as a decompression bomb.
//!
//! Owns only the codec state and the compressed input not yet decoded; knows nothing of HTTP.

use std::io::{self, BufRead, Read};

use bytes::{Buf, Bytes};

/// The most one step decodes: what the rewriter holds, and sends, per poll.
pub const DECODE_STEP: usize = 64 * 1024;
/// Decoded bytes allowed before the expansion ratio is enforced, so small bodies that compress
/// unusually well are never refused.
pub const EXPANSION_FLOOR: u64 = 16 * 1024 * 1024;
/// Decoded bytes allowed per compressed byte past [`EXPANSION_FLOOR`]. Bitbucket's JSON
/// compresses about 5-20:1; deflate cannot exceed about 1032:1, brotli bombs reach 10^6:1.
pub const MAX_EXPANSION_RATIO: u64 = 100;

/// Why decoding stopped; the transfer is aborted on any of them.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("cannot decode the upstream's compressed body: {0}")]
    Corrupt(String),
    #[error("the upstream's compressed body ended before its encoding did")]
    Truncated,
    #[error(
        "the upstream's compressed body expands more than {MAX_EXPANSION_RATIO}:1 past {} MiB ({decoded} bytes decoded from {compressed}): refused as a decompression bomb",
        EXPANSION_FLOOR >> 20
    )]
    ExpansionLimit { decoded: u64, compressed: u64 },
}

impl DecodeError {
    /// The reason logged for the aborted transfer.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Corrupt(_) | DecodeError::Truncated => "decode-failed",
            DecodeError::ExpansionLimit { .. } => "decompression-limit",
        }
    }
}

/// What one [`Decoder::step`] achieved.
pub enum Step<'a> {
    /// Decoded bytes, at most [`DECODE_STEP`].
    Data(&'a [u8]),
    /// Everything received so far is decoded; [`Decoder::push`] more (or end the input).
    NeedInput,
    /// The encoding ended and the input is over.
    End,
}

/// The compressed bytes received but not yet decoded. Reading an empty feed before the input
/// has ended is `WouldBlock`, which the gzip reader is built to resume from.
#[derive(Default)]
struct Feed {
    pending: Bytes,
    ended: bool,
    consumed: u64,
}

impl Read for Feed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Feed {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pending.is_empty() && !self.ended {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(&self.pending)
    }

    fn consume(&mut self, n: usize) {
        self.pending.advance(n);
        self.consumed += n as u64;
    }
}

type BrotliState = brotli_decompressor::BrotliState<
    brotli_decompressor::StandardAlloc,
    brotli_decompressor::StandardAlloc,
    brotli_decompressor::StandardAlloc,
>;

enum Codec {
    Gzip(Box<flate2::bufread::MultiGzDecoder<Feed>>),
    Deflate {
        state: Box<flate2::Decompress>,
        feed: Feed,
        done: bool,
    },
    Brotli {
        state: Box<BrotliState>,
        feed: Feed,
        done: bool,
    },
}

/// One response body's decoder.
pub struct Decoder {
    codec: Codec,
    out: Box<[u8]>,
    decoded: u64,
}

impl Decoder {
    /// The codings the rewriter can decode (`Content-Encoding` values).
    pub fn supports(coding: &str) -> bool {
        ["gzip", "x-gzip", "deflate", "br"]
            .iter()
            .any(|c| c.eq_ignore_ascii_case(coding))
    }

    pub fn for_coding(coding: &str) -> Option<Decoder> {
        let codec = match coding.to_ascii_lowercase().as_str() {
            "gzip" | "x-gzip" => Codec::Gzip(Box::new(flate2::bufread::MultiGzDecoder::new(
                Feed::default(),
            ))),
            "deflate" => Codec::Deflate {
                state: Box::new(flate2::Decompress::new(true)),
                feed: Feed::default(),
                done: false,
            },
            "br" => {
                use brotli_decompressor::StandardAlloc;
                Codec::Brotli {
                    state: Box::new(BrotliState::new(
                        StandardAlloc::default(),
                        StandardAlloc::default(),
                        StandardAlloc::default(),
                    )),
                    feed: Feed::default(),
                    done: false,
                }
            }
            _ => return None,
        };
        Some(Decoder {
            codec,
            out: vec![0; DECODE_STEP].into_boxed_slice(),
            decoded: 0,
        })
    }

    fn feed(&mut self) -> &mut Feed {
        match &mut self.codec {
            Codec::Gzip(decoder) => decoder.get_mut(),
            Codec::Deflate { feed, .. } | Codec::Brotli { feed, .. } => feed,
        }
    }

    /// More compressed input; call only after a step asked for it ([`Step::NeedInput`]).
    pub fn push(&mut self, input: Bytes) {
        let feed = self.feed();
        debug_assert!(feed.pending.is_empty());
        feed.pending = input;
    }

    /// The compressed input is over: steps now finish the encoding or report it truncated.
    pub fn end_input(&mut self) {
        self.feed().ended = true;
    }

    /// Decodes at most [`DECODE_STEP`] bytes.
    pub fn step(&mut self) -> Result<Step<'_>, DecodeError> {
        let produced = match &mut self.codec {
            Codec::Gzip(decoder) => match decoder.read(&mut self.out) {
                Ok(0) => return Ok(Step::End),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::NeedInput),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(DecodeError::Truncated);
                }
                Err(e) => return Err(DecodeError::Corrupt(e.to_string())),
            },
            Codec::Deflate { state, feed, done } => {
                if *done {
                    return Ok(if feed.ended {
                        Step::End
                    } else {
                        Step::NeedInput
                    });
                }
                let (before_in, before_out) = (state.total_in(), state.total_out());
                let status = state
                    .decompress(&feed.pending, &mut self.out, flate2::FlushDecompress::None)
                    .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
                feed.consume((state.total_in() - before_in) as usize);
                let produced = (state.total_out() - before_out) as usize;
                *done = status == flate2::Status::StreamEnd;
                if produced == 0 {
                    return no_output(*done, feed);
                }
                produced
            }
            Codec::Brotli { state, feed, done } => {
                use brotli_decompressor::BrotliResult;
                if *done {
                    return Ok(if feed.ended {
                        Step::End
                    } else {
                        Step::NeedInput
                    });
                }
                let (mut available_in, mut input_offset) = (feed.pending.len(), 0);
                let (mut available_out, mut output_offset, mut total_out) = (self.out.len(), 0, 0);
                let result = brotli_decompressor::BrotliDecompressStream(
                    &mut available_in,
                    &mut input_offset,
                    &feed.pending,
                    &mut available_out,
                    &mut output_offset,
                    &mut self.out,
                    &mut total_out,
                    state,
                );
                feed.consume(input_offset);
                match result {
                    BrotliResult::ResultFailure => {
                        return Err(DecodeError::Corrupt(format!(
                            "invalid brotli stream ({:?})",
                            state.error_code
                        )));
                    }
                    BrotliResult::ResultSuccess => *done = true,
                    BrotliResult::NeedsMoreInput | BrotliResult::NeedsMoreOutput => {}
                }
                if output_offset == 0 {
                    return no_output(*done, feed);
                }
                output_offset
            }
        };
        self.decoded += produced as u64;
        let compressed = self.feed().consumed;
        if self.decoded > EXPANSION_FLOOR
            && self.decoded > compressed.saturating_mul(MAX_EXPANSION_RATIO)
        {
            return Err(DecodeError::ExpansionLimit {
                decoded: self.decoded,
                compressed,
            });
        }
        Ok(Step::Data(&self.out[..produced]))
    }
}

/// A step of a low-level codec that decoded nothing: finished, starved, or cut short.
fn no_output(done: bool, feed: &Feed) -> Result<Step<'static>, DecodeError> {
    if done {
        // Trailing bytes after the end of the encoding are ignored, like other decoders do.
        return Ok(if feed.ended {
            Step::End
        } else {
            Step::NeedInput
        });
    }
    if feed.pending.is_empty() {
        return if feed.ended {
            Err(DecodeError::Truncated)
        } else {
            Ok(Step::NeedInput)
        };
    }
    // Input left, no output, not done: the codec is stuck on bytes it cannot use.
    Err(DecodeError::Corrupt(
        "the decoder made no progress on its input".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// Decodes `encoded` fed in `chunk`-byte pieces; the output and the largest step.
    fn decode(coding: &str, encoded: &[u8], chunk: usize) -> Result<(Vec<u8>, usize), DecodeError> {
        let mut decoder = Decoder::for_coding(coding).unwrap();
        let mut pieces = encoded.chunks(chunk);
        let (mut out, mut largest) = (Vec::new(), 0);
        loop {
            match decoder.step()? {
                Step::Data(data) => {
                    largest = largest.max(data.len());
                    out.extend_from_slice(data);
                }
                Step::NeedInput => match pieces.next() {
                    Some(piece) => decoder.push(Bytes::copy_from_slice(piece)),
                    None => decoder.end_input(),
                },
                Step::End => return Ok((out, largest)),
            }
        }
    }

    fn sample() -> Vec<u8> {
        (0..200_000u32)
            .flat_map(|i| format!("{{\"n\":{i}}},").into_bytes())
            .collect()
    }

    #[test]
    fn gzip_and_deflate_round_trip_in_bounded_steps_whatever_the_input_split() {
        let data = sample();
        for (coding, encoded) in [("gzip", gzip(&data)), ("deflate", zlib(&data))] {
            for chunk in [1, 7, 4096, usize::MAX] {
                let (out, largest) = decode(coding, &encoded, chunk).unwrap();
                assert!(out == data, "{coding} in {chunk}-byte pieces");
                assert!(largest <= DECODE_STEP);
            }
        }
    }

    #[test]
    fn concatenated_gzip_members_decode_as_one_body() {
        let encoded = [gzip(b"[1,"), gzip(b"2]")].concat();
        assert_eq!(decode("gzip", &encoded, 3).unwrap().0, b"[1,2]");
    }

    #[test]
    fn a_truncated_body_is_an_error_not_a_shorter_body() {
        let data = sample();
        for (coding, encoded) in [("gzip", gzip(&data)), ("deflate", zlib(&data))] {
            for cut in [5, encoded.len() / 2, encoded.len() - 1] {
                let error = decode(coding, &encoded[..cut], 1000).unwrap_err();
                assert!(
                    matches!(error, DecodeError::Truncated | DecodeError::Corrupt(_)),
                    "{coding} cut at {cut}: {error}"
                );
            }
        }
    }

    #[test]
    fn garbage_is_refused() {
        for coding in ["gzip", "deflate", "br"] {
            let error = decode(coding, &[0xff; 64], 64).unwrap_err();
            assert_eq!(error.reason(), "decode-failed", "{coding}: {error}");
        }
    }

    #[test]
    fn a_deflate_bomb_is_stopped_past_the_floor() {
        let zeros = vec![0u8; 64 << 20];
        let error = decode("deflate", &zlib(&zeros), 1 << 20).unwrap_err();
        match error {
            DecodeError::ExpansionLimit {
                decoded,
                compressed,
            } => {
                assert!(
                    decoded > EXPANSION_FLOOR && decoded <= EXPANSION_FLOOR + DECODE_STEP as u64
                );
                assert!(decoded > compressed * MAX_EXPANSION_RATIO);
            }
            other => panic!("{other}"),
        }
    }
}
