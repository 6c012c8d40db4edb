//! The text of the WGSL kernels: every file of `shaders/` embedded in the binary, and the
//! preparation of a file before it is compiled: its `//!include FILE` lines replaced by that
//! file, its `//!variant NAME` blocks kept or dropped (`select_variants`: a convolution's products
//! are matmul.wgsl with other operand maps, while the dense products compile the same text as
//! without variants), its `{{NAME}}` placeholders filled (`fill_placeholders`) and its
//! `//!unroll` lines expanded (`expand_unrolls`).
//!
//! Contract: a fault in a directive (an unknown count, a nested or open block) becomes a line
//! that fails to compile naming it, never a shader that silently lacks or doubles code.

/// Every file of `shaders/`, by name.
const SHADERS: &[(&str, &str)] = &[
    ("batch_norm.wgsl", include_str!("../../../shaders/batch_norm.wgsl")),
    ("dropout.wgsl", include_str!("../../../shaders/dropout.wgsl")),
    ("gather.wgsl", include_str!("../../../shaders/gather.wgsl")),
    ("hash.wgsl", include_str!("../../../shaders/hash.wgsl")),
    ("matmul.wgsl", include_str!("../../../shaders/matmul.wgsl")),
    ("optimizer.wgsl", include_str!("../../../shaders/optimizer.wgsl")),
    ("output_layer.wgsl", include_str!("../../../shaders/output_layer.wgsl")),
    ("pool.wgsl", include_str!("../../../shaders/pool.wgsl")),
    ("softmax_xent.wgsl", include_str!("../../../shaders/softmax_xent.wgsl")),
    ("update.wgsl", include_str!("../../../shaders/update.wgsl")),
];

/// The text of shader file `name` as written.
pub fn shader_file(name: &str) -> Option<&'static str> {
    SHADERS.iter().find(|(n, _)| *n == name).map(|(_, text)| *text)
}

/// The text of a shader file known to be in `SHADERS`.
pub(super) fn shader(name: &str) -> &'static str {
    shader_file(name).unwrap_or("unknown_shader_file;")
}

/// Replace every `{{NAME}}` of `source` by its value in `values`. A placeholder without a value
/// is left as it is, so that the shader fails to compile naming it rather than running with a
/// guess.
pub fn fill_placeholders(source: &str, values: &[(&str, u32)]) -> String {
    values.iter().fold(source.to_string(), |text, (name, v)| {
        text.replace(&format!("{{{{{name}}}}}"), &v.to_string())
    })
}

/// Replace each line `//!include FILE` by the text of that shader file.
pub(super) fn expand_includes(source: &str) -> String {
    source
        .lines()
        .map(|line| match line.trim().strip_prefix("//!include ") {
            Some(file) => shader(file.trim()).to_string(),
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Keep the lines of each block `//!variant NAME` ... `//!end` of `source` whose NAME is in
/// `chosen`, drop the other blocks, and drop the marker lines. A nested block, an `//!end`
/// outside a block or a block left open becomes a line that fails to compile, naming the fault,
/// rather than a shader that silently lacks or doubles a function.
pub fn select_variants(source: &str, chosen: &[&str]) -> String {
    let mut out = String::new();
    // Inside a block: whether it is kept.
    let mut block: Option<bool> = None;
    for line in source.lines() {
        let trimmed = line.trim();
        if let Some(name) = trimmed.strip_prefix("//!variant ") {
            if block.is_some() {
                out.push_str("nested_variant_block;\n");
            }
            block = Some(chosen.contains(&name.trim()));
        } else if trimmed == "//!end" {
            if block.is_none() {
                out.push_str("variant_end_outside_a_block;\n");
            }
            block = None;
        } else if block != Some(false) {
            out.push_str(line);
            out.push('\n');
        }
    }
    if block.is_some() {
        out.push_str("unterminated_variant_block;\n");
    }
    out
}

/// Expand each `//!unroll V COUNT: statement` line of a shader into COUNT copies of the statement
/// with `{V}` replaced by 0, 1, ...; COUNT is a number or a name `count_of` knows. naga emits
/// loops that drivers do not unroll, and a loop of loads that is not unrolled waits for each load
/// before issuing the next: unrolled, the loads are in flight together.
pub fn expand_unrolls(source: &str, count_of: impl Fn(&str) -> Option<u32>) -> String {
    let mut out = String::new();
    for line in source.lines() {
        let unroll = line.trim_start().strip_prefix("//!unroll ").and_then(|rest| {
            let (head, statement) = rest.split_once(':')?;
            let mut head = head.split_whitespace();
            let var = head.next()?;
            let count = head.next()?;
            Some((var, count.parse().ok().or_else(|| count_of(count)), statement.trim()))
        });
        match unroll {
            // An unknown COUNT must not silently drop the statement: make the shader fail to compile.
            Some((var, None, _)) => out.push_str(&format!("unknown_unroll_count_for_{var};\n")),
            Some((var, Some(count), statement)) => {
                let indent = &line[..line.len() - line.trim_start().len()];
                let pattern = format!("{{{var}}}");
                for i in 0..count {
                    out.push_str(indent);
                    out.push_str(&statement.replace(&pattern, &i.to_string()));
                    out.push('\n');
                }
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_blocks_are_kept_or_dropped_by_name() {
        let source = "a\n//!variant x\nx1\n//!end\n//!variant y\ny1\n  //!end\nb\n";
        assert_eq!(select_variants(source, &["x"]), "a\nx1\nb\n");
        assert_eq!(select_variants(source, &["y", "z"]), "a\ny1\nb\n");
        assert_eq!(select_variants(source, &[]), "a\nb\n");
        // Faults become lines that do not compile.
        assert!(select_variants("//!variant x\n//!variant y\n//!end\n", &[]).contains("nested_variant_block"));
        assert!(select_variants("//!end\n", &[]).contains("variant_end_outside_a_block"));
        assert!(select_variants("//!variant x\nx1\n", &["x"]).contains("unterminated_variant_block"));
    }
}
