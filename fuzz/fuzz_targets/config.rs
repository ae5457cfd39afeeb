//! The policy file parser: any text gives a config or positioned errors,
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(error) = breakwater::config::parse("fuzz.yaml", text) {
            // Errors render (file, line, column, field).
            let _ = error.to_string();
        }
    }
});
