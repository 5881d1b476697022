//! Meridian's async Pulsar client (under construction).
