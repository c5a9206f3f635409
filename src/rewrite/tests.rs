use std::path::Path;

use super::*;
use crate::upstream::credential::Credential;
use http_body::Frame;

const CONFIG: &str = r#"
[server]
public_url = "http://proxy.internal:8080"

[credentials.ws]
kind = "workspace_access_token"
workspace = "acme"
token = { value = "t" }

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "ws"

[[routes]]
prefix = "/release"
upstream_prefix = "/2.0/repositories/acme"
credential = "ws"

[[routes]]
prefix = "/git/acme"
upstream = "git"
upstream_prefix = "/acme"
credential = "ws"
"#;

struct Fixture {
    config: Arc<Config>,
    patterns: Arc<RewritePatterns>,
}

impl Fixture {
    fn new() -> Self {
        let config = Config::from_toml(Path::new("t.toml"), CONFIG).unwrap();
        let patterns = Arc::new(RewritePatterns::new(&config));
        Fixture {
            config: Arc::new(config),
            patterns,
        }
    }

    fn rewriter(&self, route_prefix: &str) -> LinkRewriter {
        let settings = self
            .config
            .routes
            .iter()
            .find(|r| &*r.prefix == route_prefix)
            .unwrap();
        let credential = Arc::new(Credential::from_settings(&settings.credential));
        let route = Arc::new(Route::from_settings(settings, credential));
        LinkRewriter::new(
            self.config.clone(),
            self.patterns.clone(),
            route,
            Bytes::from_static(b"http://proxy.internal:8080"),
        )
    }
}

fn rewrite_whole(rewriter: &mut LinkRewriter, input: &[u8]) -> Vec<u8> {
    rewriter.process(input, true).to_vec()
}

fn rewrite_split(rewriter: &mut LinkRewriter, input: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut start = 0;
    for &cut in cuts {
        out.extend_from_slice(&rewriter.process(&input[start..cut], false));
        start = cut;
    }
    out.extend_from_slice(&rewriter.process(&input[start..], true));
    out
}

const PAGE: &str = r#"{"pagelen":2,"next":"https://api.bitbucket.org/2.0/repositories/acme/widgets/pullrequests?page=2&state=OPEN#frag","values":[{"links":{"self":{"href":"https://api.bitbucket.org/2.0/repositories/acme/widgets/pullrequests/1"},"html":{"href":"https://bitbucket.org/acme/widgets/pull-requests/1"},"avatar":{"href":"https://avatar-management--avatars.us-west-2.prod.public.atl-paas.net/x.png"},"evil":{"href":"https://api.bitbucket.org.evil.example/2.0/x"},"user":{"href":"https://api.bitbucket.org/2.0/users/%7Babc%7D"}}}]}"#;

const PAGE_VIA_ACME: &str = r#"{"pagelen":2,"next":"http://proxy.internal:8080/2.0/repositories/acme/widgets/pullrequests?page=2&state=OPEN#frag","values":[{"links":{"self":{"href":"http://proxy.internal:8080/2.0/repositories/acme/widgets/pullrequests/1"},"html":{"href":"https://bitbucket.org/acme/widgets/pull-requests/1"},"avatar":{"href":"https://avatar-management--avatars.us-west-2.prod.public.atl-paas.net/x.png"},"evil":{"href":"https://api.bitbucket.org.evil.example/2.0/x"},"user":{"href":"http://proxy.internal:8080/2.0/users/%7Babc%7D"}}}]}"#;

#[test]
fn upstream_urls_point_back_at_the_proxy_and_others_are_untouched() {
    let fixture = Fixture::new();
    let out = rewrite_whole(
        &mut fixture.rewriter("/2.0/repositories/acme"),
        PAGE.as_bytes(),
    );
    assert_eq!(String::from_utf8(out).unwrap(), PAGE_VIA_ACME);
}

#[test]
fn alias_routes_map_paths_back_to_the_alias() {
    let fixture = Fixture::new();
    let out = rewrite_whole(&mut fixture.rewriter("/release"), PAGE.as_bytes());
    let expected = PAGE_VIA_ACME.replace("8080/2.0/repositories/acme/", "8080/release/");
    assert_eq!(String::from_utf8(out).unwrap(), expected);
}

#[test]
fn every_chunk_boundary_gives_the_same_output() {
    let fixture = Fixture::new();
    let input = PAGE.as_bytes();
    for cut in 0..=input.len() {
        let out = rewrite_split(
            &mut fixture.rewriter("/2.0/repositories/acme"),
            input,
            &[cut],
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            PAGE_VIA_ACME,
            "cut at {cut}"
        );
    }
    for a in (0..input.len()).step_by(7) {
        for b in (a..input.len()).step_by(11) {
            let out = rewrite_split(
                &mut fixture.rewriter("/2.0/repositories/acme"),
                input,
                &[a, b],
            );
            assert_eq!(
                String::from_utf8(out).unwrap(),
                PAGE_VIA_ACME,
                "cuts at {a}, {b}"
            );
        }
    }
    let one_byte_chunks: Vec<usize> = (1..input.len()).collect();
    let out = rewrite_split(
        &mut fixture.rewriter("/2.0/repositories/acme"),
        input,
        &one_byte_chunks,
    );
    assert_eq!(String::from_utf8(out).unwrap(), PAGE_VIA_ACME);
}

#[test]
fn json_escaped_slashes_are_rewritten_in_the_same_form() {
    let fixture = Fixture::new();
    let input = r#"{"next":"https:\/\/api.bitbucket.org\/2.0\/repositories\/acme\/widgets\/commits?page=3","x":"https:\/\/bitbucket.org\/acme"}"#;
    let expected = r#"{"next":"http:\/\/proxy.internal:8080\/release\/widgets\/commits?page=3","x":"https:\/\/bitbucket.org\/acme"}"#;
    for cut in 0..=input.len() {
        let out = rewrite_split(&mut fixture.rewriter("/release"), input.as_bytes(), &[cut]);
        assert_eq!(String::from_utf8(out).unwrap(), expected, "cut at {cut}");
    }
}

#[test]
fn uncovered_paths_keep_their_path_and_bare_origins_are_rewritten() {
    let fixture = Fixture::new();
    let input = br#"["https://api.bitbucket.org/2.0/user","https://api.bitbucket.org","https://api.bitbucket.org/"]"#;
    let out = rewrite_whole(&mut fixture.rewriter("/2.0/repositories/acme"), input);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        r#"["http://proxy.internal:8080/2.0/user","http://proxy.internal:8080","http://proxy.internal:8080/"]"#
    );
}

#[test]
fn git_routes_also_rewrite_the_git_origin() {
    let fixture = Fixture::new();
    let input = br#"{"clone":"https://bitbucket.org/acme/widgets.git","api":"https://api.bitbucket.org/2.0/repositories/acme/widgets"}"#;
    let out = rewrite_whole(&mut fixture.rewriter("/git/acme"), input);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        r#"{"clone":"http://proxy.internal:8080/git/acme/widgets.git","api":"http://proxy.internal:8080/2.0/repositories/acme/widgets"}"#
    );
    // REST routes leave bitbucket.org (web pages) alone.
    let out = rewrite_whole(&mut fixture.rewriter("/2.0/repositories/acme"), input);
    assert!(
        String::from_utf8(out)
            .unwrap()
            .contains("\"https://bitbucket.org/acme/widgets.git\"")
    );
}

#[test]
fn headers_are_rewritten() {
    let fixture = Fixture::new();
    let rewriter = fixture.rewriter("/release");
    let link = rewriter.rewrite_header(
        &header::LINK,
        b"<https://api.bitbucket.org/2.0/repositories/acme/widgets/commits?page=2>; rel=\"next\"",
    );
    assert_eq!(
        &link[..],
        &b"<http://proxy.internal:8080/release/widgets/commits?page=2>; rel=\"next\""[..]
    );
    let same_origin = rewriter.rewrite_header(
        &header::LOCATION,
        b"https://api.bitbucket.org/2.0/repositories/acme/widgets/diff/a..b",
    );
    assert_eq!(
        &same_origin[..],
        &b"http://proxy.internal:8080/release/widgets/diff/a..b"[..]
    );
    let storage = b"https://bbuseruploads.s3.amazonaws.com/x/y?Signature=abc";
    assert_eq!(
        &rewriter.rewrite_header(&header::LOCATION, storage)[..],
        &storage[..]
    );
    let relative =
        rewriter.rewrite_header(&header::LOCATION, b"/2.0/repositories/acme/widgets?x=1");
    assert_eq!(&relative[..], &b"/release/widgets?x=1"[..]);
}

#[test]
fn long_urls_are_rewritten_while_only_a_few_bytes_are_carried() {
    let fixture = Fixture::new();
    let mut rewriter = fixture.rewriter("/2.0/repositories/acme");
    let long_path = "a".repeat(12 * 1024);
    let input = format!(r#""https://api.bitbucket.org/2.0/repositories/acme/{long_path}""#);
    let expected = format!(r#""http://proxy.internal:8080/2.0/repositories/acme/{long_path}""#);
    let mut out = Vec::new();
    for chunk in input.as_bytes().chunks(7) {
        out.extend_from_slice(&rewriter.process(chunk, false));
        assert!(
            rewriter.carry.len() <= fixture.patterns.lookahead(),
            "carry grew to {}",
            rewriter.carry.len()
        );
    }
    out.extend_from_slice(&rewriter.process(&[], true));
    assert_eq!(String::from_utf8(out).unwrap(), expected);
}

#[test]
fn accept_encoding_is_narrowed_to_decodable_codings() {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("gzip, zstd;q=0.9, br, identity"),
    );
    restrict_accept_encoding(&mut headers);
    assert_eq!(headers[header::ACCEPT_ENCODING], "gzip, br, identity");
    headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("zstd"));
    restrict_accept_encoding(&mut headers);
    assert!(!headers.contains_key(header::ACCEPT_ENCODING));
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("gzip, deflate"),
    );
    restrict_accept_encoding(&mut headers);
    assert_eq!(headers[header::ACCEPT_ENCODING], "gzip, deflate");
}

#[test]
fn json_detection() {
    let mut headers = HeaderMap::new();
    for (value, json) in [
        ("application/json", true),
        ("application/json; charset=utf-8", true),
        ("application/problem+json", true),
        ("text/plain", false),
        ("application/octet-stream", false),
        ("application/x-git-upload-pack-result", false),
    ] {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
        assert_eq!(is_json(&headers), json, "{value}");
    }
}

mod streaming {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;
    use http_body_util::{BodyExt, StreamBody};
    use std::io::Write;

    fn body_of(chunks: Vec<Vec<u8>>) -> impl Body<Data = Bytes, Error = BoxError> {
        let frames = chunks
            .into_iter()
            .map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from(c))));
        StreamBody::new(futures_util::stream::iter(frames))
    }

    async fn run(
        rewriter: LinkRewriter,
        decoder: Option<Decoder>,
        chunks: Vec<Vec<u8>>,
    ) -> Result<Vec<u8>, BoxError> {
        let body = RewriteBody {
            inner: body_of(chunks),
            rewriter,
            decoder,
            trailers: None,
            done: false,
        };
        Ok(body.collect().await?.to_bytes().to_vec())
    }

    #[tokio::test]
    async fn gzip_bodies_are_decoded_and_rewritten() {
        let fixture = Fixture::new();
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(PAGE.as_bytes()).unwrap();
        let compressed = encoder.finish().unwrap();
        let chunks: Vec<Vec<u8>> = compressed.chunks(13).map(<[u8]>::to_vec).collect();
        let out = run(
            fixture.rewriter("/2.0/repositories/acme"),
            Decoder::for_coding("gzip"),
            chunks,
        )
        .await
        .unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), PAGE_VIA_ACME);
    }

    #[tokio::test]
    async fn truncated_gzip_is_an_error_not_a_short_body() {
        let fixture = Fixture::new();
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(PAGE.as_bytes()).unwrap();
        let mut compressed = encoder.finish().unwrap();
        compressed.truncate(compressed.len() / 2);
        let result = run(
            fixture.rewriter("/2.0/repositories/acme"),
            Decoder::for_coding("gzip"),
            vec![compressed],
        )
        .await;
        assert!(result.is_err());
    }

    #[tokio::test]
    async fn plain_bodies_stream_chunk_by_chunk() {
        let fixture = Fixture::new();
        let chunks: Vec<Vec<u8>> = PAGE.as_bytes().chunks(5).map(<[u8]>::to_vec).collect();
        let out = run(fixture.rewriter("/2.0/repositories/acme"), None, chunks)
            .await
            .unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), PAGE_VIA_ACME);
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn fragment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("https://api.bitbucket.org".to_owned()),
            Just("https:\\/\\/api.bitbucket.org".to_owned()),
            Just("https://bitbucket.org".to_owned()),
            Just("/2.0/repositories/acme/widgets".to_owned()),
            Just("\\/2.0\\/repositories\\/acme".to_owned()),
            Just("?page=2".to_owned()),
            Just("\"".to_owned()),
            Just(".evil".to_owned()),
            Just("\\".to_owned()),
            Just("/".to_owned()),
            "[a-z%0-9 ,:{}]{0,6}",
        ]
    }

    proptest! {
        /// However a body is cut into chunks, the output is the same as rewriting it whole.
        #[test]
        fn chunking_never_changes_the_output(
            pieces in proptest::collection::vec(fragment(), 0..24),
            cuts in proptest::collection::vec(0usize..400, 0..8),
        ) {
            let fixture = Fixture::new();
            let input = pieces.concat();
            let whole = rewrite_whole(&mut fixture.rewriter("/release"), input.as_bytes());
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(input.len())).collect();
            cuts.sort_unstable();
            let split = rewrite_split(&mut fixture.rewriter("/release"), input.as_bytes(), &cuts);
            prop_assert_eq!(String::from_utf8_lossy(&split), String::from_utf8_lossy(&whole));
        }
    }
}
