//! The running configuration: a [`state::Generation`] is every live object built from one
//! validated [`crate::Config`] (the route table with its credentials, the upstream client, the
//! rewriter, cache, budgets and store), in one place, swapped atomically by [`reload`];
//! [`verify`] checks credentials against Bitbucket in the background.
//!
//! Uses every layer below it and none above: the proxy phases and the server read the
//! generation, never build it.

pub mod credential_status;
pub mod reload;
pub mod state;
pub mod verify;
