//! Building blocks that know nothing of routes, credentials or configuration: the body types
//! every layer streams through, header hygiene, the secret types that cannot be printed, and
//! what this binary was built from.
//!
//! Uses no other module of the crate.

pub mod body;
pub mod build_info;
pub mod headers;
pub mod secrets;

/// `outer: inner: innermost`, so logs and error details carry the root cause.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(e) = current {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        current = e.source();
        if current.is_none()
            && let Some(inner) = e
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
        {
            let inner = inner.to_string();
            if !text.contains(&inner) {
                text.push_str(": ");
                text.push_str(&inner);
            }
        }
    }
    text
}
