//! JSON objects read the way Go's `encoding/json` reads them into a struct.
//!
//! flannel parses its network config and lease values with Go's decoder, which
//! matches keys case-insensitively (`"network"` fills `Network`), ignores
//! unknown keys and lets a key given twice keep its last value. To accept every
//! document a flannel node accepts, we keep the object's members in order with
//! their raw values and look fields up the same way.

use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::value::RawValue;

/// A JSON object whose members are kept in document order with raw values.
#[derive(Debug, Clone, Default)]
pub struct GoObject {
    members: Vec<(String, Box<RawValue>)>,
}

/// Why a field of a [`GoObject`] could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field {field}: expected {expected}, found {found}")]
pub struct FieldError {
    /// The field name as the caller spelled it (`SubnetLen`).
    pub field: String,
    /// What the field must hold, in words (`an integer`).
    pub expected: &'static str,
    /// The raw JSON text that was found.
    pub found: String,
}

impl GoObject {
    /// Parses `text` as one JSON object. Anything else (an array, a number,
    /// trailing bytes) is an error naming what was found.
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Builds an object from a raw JSON value that must be an object.
    pub fn from_raw(raw: &RawValue) -> Result<Self, serde_json::Error> {
        serde_json::from_str(raw.get())
    }

    /// The raw value of `name`, matched case-insensitively; the last matching
    /// member wins, as with Go.
    pub fn raw(&self, name: &str) -> Option<&RawValue> {
        self.members
            .iter()
            .rev()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_ref())
    }

    /// Whether `name` is present with a value other than `null`.
    pub fn has(&self, name: &str) -> bool {
        self.raw(name).is_some_and(|raw| raw.get() != "null")
    }

    /// Decodes `name` into `T`. Absent or `null` is `Ok(None)`, as Go leaves
    /// the field at its zero value; a value of the wrong type is an error that
    /// names the field, what it must be and what was found.
    pub fn get<T: DeserializeOwned>(
        &self,
        name: &str,
        expected: &'static str,
    ) -> Result<Option<T>, FieldError> {
        match self.raw(name) {
            None => Ok(None),
            Some(raw) if raw.get() == "null" => Ok(None),
            Some(raw) => serde_json::from_str(raw.get())
                .map(Some)
                .map_err(|_| FieldError {
                    field: name.to_owned(),
                    expected,
                    found: raw.get().to_owned(),
                }),
        }
    }

    /// Whether the object has no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

impl<'de> Deserialize<'de> for GoObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;

        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = GoObject;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<GoObject, A::Error> {
                let mut members = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, Box<RawValue>>()? {
                    members.push((key, value));
                }
                Ok(GoObject { members })
            }
        }

        deserializer.deserialize_map(ObjectVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_case_insensitively_and_last_wins() {
        let obj =
            GoObject::parse(r#"{"network":"10.0.0.0/8","NETWORK":"10.1.0.0/16","x":1}"#).unwrap();
        assert_eq!(
            obj.get::<String>("Network", "a string").unwrap().as_deref(),
            Some("10.1.0.0/16")
        );
        assert!(obj.has("X"));
        assert!(!obj.has("missing"));
    }

    #[test]
    fn null_reads_as_absent() {
        let obj = GoObject::parse(r#"{"SubnetLen":null}"#).unwrap();
        assert_eq!(obj.get::<u32>("SubnetLen", "an integer").unwrap(), None);
        assert!(!obj.has("SubnetLen"));
    }

    #[test]
    fn wrong_type_names_field_and_value() {
        let obj = GoObject::parse(r#"{"SubnetLen":"24"}"#).unwrap();
        let err = obj.get::<u32>("SubnetLen", "an integer").unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"field SubnetLen: expected an integer, found "24""#
        );
    }

    #[test]
    fn non_object_is_rejected() {
        assert!(GoObject::parse("[1,2]").is_err());
        assert!(GoObject::parse("{} x").is_err());
    }
}
