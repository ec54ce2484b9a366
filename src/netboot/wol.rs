//! wol
