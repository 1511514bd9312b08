//! The lmforge v1 gRPC contract: prost messages and tonic clients/servers generated from
//! `proto/lmforge/v1/*.proto`, and the encoded file descriptor set that every server hands
//! to gRPC reflection.

/// Package `lmforge.v1`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("lmforge.v1");
}

/// Encoded `FileDescriptorSet` of every lmforge proto, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/lmforge_descriptor.bin"));

/// `google.protobuf.Struct` ↔ JSON, for the contract's free-form JSON fields.
pub mod json {
    use prost_types::value::Kind;

    /// `google.protobuf.Struct` → JSON object.
    pub fn struct_to_json(value: &prost_types::Struct) -> serde_json::Value {
        serde_json::Value::Object(
            value
                .fields
                .iter()
                .map(|(k, v)| (k.clone(), value_to_json(v)))
                .collect(),
        )
    }

    fn value_to_json(value: &prost_types::Value) -> serde_json::Value {
        match &value.kind {
            None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
            Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
            // Struct numbers are doubles; whole ones come back as JSON integers (a schema's
            // `maxLength: 8` must stay an integer).
            Some(Kind::NumberValue(n))
                if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 =>
            {
                serde_json::Value::from(*n as i64)
            }
            Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
                .map_or(serde_json::Value::Null, serde_json::Value::Number),
            Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
            Some(Kind::ListValue(list)) => {
                serde_json::Value::Array(list.values.iter().map(value_to_json).collect())
            }
            Some(Kind::StructValue(s)) => struct_to_json(s),
        }
    }

    /// JSON → `google.protobuf.Struct` (non-objects become an empty struct).
    pub fn json_to_struct(value: &serde_json::Value) -> prost_types::Struct {
        let fields = match value {
            serde_json::Value::Object(map) => map
                .iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
            _ => Default::default(),
        };
        prost_types::Struct { fields }
    }

    fn json_to_value(value: &serde_json::Value) -> prost_types::Value {
        let kind = match value {
            serde_json::Value::Null => Kind::NullValue(0),
            serde_json::Value::Bool(b) => Kind::BoolValue(*b),
            serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
            serde_json::Value::String(s) => Kind::StringValue(s.clone()),
            serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
                values: items.iter().map(json_to_value).collect(),
            }),
            serde_json::Value::Object(_) => Kind::StructValue(json_to_struct(value)),
        };
        prost_types::Value { kind: Some(kind) }
    }
}

#[cfg(test)]
mod tests {
    use super::json::{json_to_struct, struct_to_json};

    #[test]
    fn json_survives_a_struct_round_trip_with_integers_kept() {
        let value = serde_json::json!({
            "maxLength": 8, "ratio": 0.5, "neg": -3, "items": [1, "a", null, true, {"x": 2}],
        });
        assert_eq!(struct_to_json(&json_to_struct(&value)), value);
        assert!(struct_to_json(&json_to_struct(&value))["maxLength"].is_u64());
    }
}
