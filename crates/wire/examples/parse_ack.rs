//! Times `decode_frame` on ACK frames (one per message, as the `pulsar` crate sends them);
//! with `ALONE=1`, `decode_frame_or_ack`, which the broker uses.
use bytes::BytesMut;
use meridian_wire::proto::{
    base_command::Type, command_ack, BaseCommand, CommandAck, MessageIdData,
};
use prost::Message;

fn main() {
    let ack = BaseCommand {
        r#type: Type::Ack as i32,
        ack: Some(CommandAck {
            consumer_id: 1,
            ack_type: command_ack::AckType::Individual as i32,
            message_id: vec![MessageIdData {
                ledger_id: 123456789,
                entry_id: 42,
                batch_index: Some(3),
                batch_size: Some(128),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let body = ack.encode_to_vec();
    let mut frame = Vec::new();
    frame.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(2_000_000);
    let alone = std::env::var("ALONE").is_ok_and(|value| value == "1");
    let mut buffer = BytesMut::with_capacity(frame.len() * 1000);
    let started = std::time::Instant::now();
    let mut decoded = 0;
    for _ in 0..rounds / 1000 {
        for _ in 0..1000 {
            buffer.extend_from_slice(&frame);
        }
        if alone {
            while let Some(decoded_ack) =
                meridian_wire::decode_frame_or_ack(&mut buffer, 5 << 20).expect("decode")
            {
                decoded += 1;
                std::hint::black_box(decoded_ack);
            }
        } else {
            while let Some(frame) =
                meridian_wire::decode_frame(&mut buffer, 5 << 20).expect("decode")
            {
                decoded += 1;
                std::hint::black_box(frame);
            }
        }
    }
    let elapsed = started.elapsed();
    println!(
        "{decoded} frames, {:.1} ns per frame",
        elapsed.as_nanos() as f64 / decoded as f64
    );
}
