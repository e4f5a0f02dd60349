//! What the node's local API and its clients exchange: the types of [`coyote_wire`], and the views
//! of this crate's parts that only the CLI reads.

pub use crate::backups::{RestoredCopy, TakenView, VerifyView};
pub use crate::reconciler::PlanView;
pub use coyote_wire::*;
