//! Payload compression, codec by codec, in the formats Pulsar's clients use:
//! LZ4 *block* format (no frame), zlib (deflate with the zlib header), a zstd
//! frame, and *raw* Snappy (no framing). The uncompressed size travels in
//! `MessageMetadata.uncompressed_size`, which every decoder is given and
//! holds the output to: a payload that claims more than the caller's limit,
//! or decodes to a different size, is an error, never an allocation.

use std::io::{Read, Write};

use bytes::Bytes;
use meridian_wire::CompressionType;

use crate::error::{Error, Result};

/// A compression codec for producer payloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Compression {
    /// No compression.
    #[default]
    None,
    /// LZ4 block format.
    Lz4,
    /// zlib (deflate) format.
    Zlib,
    /// Zstandard, level 3 (Pulsar's default level).
    Zstd,
    /// Raw Snappy.
    Snappy,
}

/// Zstandard level, as Pulsar's clients use.
const ZSTD_LEVEL: i32 = 3;

impl Compression {
    /// The wire value for `MessageMetadata.compression`.
    pub fn wire(self) -> CompressionType {
        match self {
            Compression::None => CompressionType::None,
            Compression::Lz4 => CompressionType::Lz4,
            Compression::Zlib => CompressionType::Zlib,
            Compression::Zstd => CompressionType::Zstd,
            Compression::Snappy => CompressionType::Snappy,
        }
    }

    /// The codec for a wire value, or `None` for a number this client does not know.
    pub fn from_wire(value: i32) -> Option<Compression> {
        match CompressionType::try_from(value).ok()? {
            CompressionType::None => Some(Compression::None),
            CompressionType::Lz4 => Some(Compression::Lz4),
            CompressionType::Zlib => Some(Compression::Zlib),
            CompressionType::Zstd => Some(Compression::Zstd),
            CompressionType::Snappy => Some(Compression::Snappy),
        }
    }

    /// The codec's name, for errors and logs.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "uncompressed",
            Compression::Lz4 => "LZ4",
            Compression::Zlib => "ZLIB",
            Compression::Zstd => "ZSTD",
            Compression::Snappy => "Snappy",
        }
    }

    fn error(self, reason: impl ToString) -> Error {
        Error::Compression {
            codec: self.name(),
            reason: reason.to_string(),
        }
    }

    /// Compresses `input` (returns it unchanged for [`Compression::None`]).
    pub fn compress(self, input: Bytes) -> Result<Bytes> {
        let output = match self {
            Compression::None => return Ok(input),
            Compression::Lz4 => lz4_flex::block::compress(&input),
            Compression::Zlib => {
                let mut encoder =
                    flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
                encoder
                    .write_all(&input)
                    .and_then(|()| encoder.finish())
                    .map_err(|error| self.error(error))?
            }
            Compression::Zstd => {
                zstd::bulk::compress(&input, ZSTD_LEVEL).map_err(|error| self.error(error))?
            }
            Compression::Snappy => snap::raw::Encoder::new()
                .compress_vec(&input)
                .map_err(|error| self.error(error))?,
        };
        Ok(Bytes::from(output))
    }

    /// Decompresses `input` to exactly `uncompressed_size` bytes, refusing
    /// sizes above `max_size` before allocating anything.
    pub fn decompress(
        self,
        input: Bytes,
        uncompressed_size: usize,
        max_size: usize,
    ) -> Result<Bytes> {
        if self == Compression::None {
            return Ok(input);
        }
        if uncompressed_size > max_size {
            return Err(self.error(format!(
                "uncompressed size {uncompressed_size} exceeds the limit of {max_size} bytes"
            )));
        }
        let output = match self {
            Compression::None => return Ok(input),
            Compression::Lz4 => {
                let mut output = vec![0; uncompressed_size];
                let written = lz4_flex::block::decompress_into(&input, &mut output)
                    .map_err(|error| self.error(error))?;
                output.truncate(written);
                output
            }
            Compression::Zlib => {
                let mut output = Vec::with_capacity(uncompressed_size);
                // Read one byte more than announced, to notice a payload that
                // inflates beyond its declared size without inflating all of it.
                flate2::read::ZlibDecoder::new(&input[..])
                    .take(uncompressed_size as u64 + 1)
                    .read_to_end(&mut output)
                    .map_err(|error| self.error(error))?;
                output
            }
            Compression::Zstd => zstd::bulk::decompress(&input, uncompressed_size)
                .map_err(|error| self.error(error))?,
            Compression::Snappy => {
                let length =
                    snap::raw::decompress_len(&input).map_err(|error| self.error(error))?;
                if length != uncompressed_size {
                    return Err(self.error(format!(
                        "payload decodes to {length} bytes, metadata says {uncompressed_size}"
                    )));
                }
                snap::raw::Decoder::new()
                    .decompress_vec(&input)
                    .map_err(|error| self.error(error))?
            }
        };
        if output.len() != uncompressed_size {
            return Err(self.error(format!(
                "payload decodes to {} bytes, metadata says {uncompressed_size}",
                output.len()
            )));
        }
        Ok(Bytes::from(output))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Compression; 5] = [
        Compression::None,
        Compression::Lz4,
        Compression::Zlib,
        Compression::Zstd,
        Compression::Snappy,
    ];

    fn sample() -> Bytes {
        let text: String = (0..2000)
            .map(|index| format!("message {index} of a compressible payload; "))
            .collect();
        Bytes::from(text)
    }

    #[test]
    fn every_codec_round_trips() {
        for codec in ALL {
            let input = sample();
            let compressed = codec.compress(input.clone()).expect("compress");
            if codec != Compression::None {
                assert!(
                    compressed.len() < input.len(),
                    "{codec:?} did not shrink the sample"
                );
            }
            let output = codec
                .decompress(compressed, input.len(), 1 << 20)
                .expect("decompress");
            assert_eq!(output, input, "{codec:?}");
            assert_eq!(Compression::from_wire(codec.wire() as i32), Some(codec));
        }
    }

    #[test]
    fn empty_payloads_round_trip() {
        for codec in ALL {
            let compressed = codec.compress(Bytes::new()).expect("compress");
            let output = codec.decompress(compressed, 0, 1024).expect("decompress");
            assert!(output.is_empty(), "{codec:?}");
        }
    }

    #[test]
    fn a_wrong_uncompressed_size_is_an_error() {
        for codec in ALL.into_iter().skip(1) {
            let input = sample();
            let compressed = codec.compress(input.clone()).expect("compress");
            assert!(
                codec
                    .decompress(compressed.clone(), input.len() - 1, 1 << 20)
                    .is_err(),
                "{codec:?} accepted a short size"
            );
            assert!(
                codec.decompress(compressed, input.len(), 100).is_err(),
                "{codec:?} ignored the size limit"
            );
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for codec in ALL.into_iter().skip(1) {
            let garbage = Bytes::from_static(&[0xff, 0x00, 0x13, 0x37, 0x42, 0x99, 0x01]);
            assert!(codec.decompress(garbage, 64, 1024).is_err(), "{codec:?}");
        }
    }
}
