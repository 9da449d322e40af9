//! Tether's wire vocabulary, shared by the server, the SDK and the load generator.
//!
//! Everything here is plain data plus its encoding: client frames (decoded from
//! JSON text), server frames (encoded to JSON text), lifecycle events, the close
//! codes of SPEC section 4 with their reconnect rule, and the admission refusals of
//! SPEC section 2. No I/O, no runtime: these types live as long as the caller keeps them.
#![warn(missing_docs)]

pub mod close;
pub mod event;
pub mod frame;
pub mod position;
pub mod refusal;
pub mod wire;

pub use close::{CloseCode, Closing};
pub use event::{EventType, LifecycleEvent};
pub use frame::{ClientFrame, FrameError, ServerFrame};
pub use position::{valid_channel, Cursor, Position};
pub use refusal::Refusal;
