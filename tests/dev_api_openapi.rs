//! Keeps the dev API OpenAPI document true (being written).
