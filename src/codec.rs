//! The control plane API's gRPC codec: prost's, except that a request that
//! is not a valid protobuf message is answered `INVALID_ARGUMENT` (it is
//! the caller's mistake) rather than tonic's `INTERNAL`.

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Prost encoding with `INVALID_ARGUMENT` for undecodable messages.
#[derive(Debug, Clone, Default)]
pub struct ApiCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Codec for ApiCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ApiDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ApiDecoder(self.0.decoder())
    }
}

/// Decodes with prost, naming a malformed message as such.
#[derive(Debug)]
pub struct ApiDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for ApiDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            if status.code() == tonic::Code::Internal {
                Status::invalid_argument(format!(
                    "the message is not valid protobuf: {}",
                    status.message()
                ))
            } else {
                status
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
