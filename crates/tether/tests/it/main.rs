//! Tether's end-to-end tests: one test binary (one link, one copy of `support`), a
//! module per area. Each test talks to an in-process server or the real binary over
//! real sockets and ends with the leak check in `support`.

mod support;

mod admin;
mod admission;
mod auth;
mod binary;
mod chaos;
mod cluster_channels;
mod cluster_registry;
mod cluster_shard;
mod delivery;
mod hardening;
mod lifecycle;
mod metrics;
mod netns;
mod openapi;
mod protocol;
mod proxy;
mod sdk;
mod sockets;
mod tls;
mod webhooks;
