//! `gpu-mnist devices`: every wgpu adapter with backend, type and the limits we depend on.

use gpu_mnist::backend::wgpu::list_adapters;
use gpu_mnist::Result;

pub fn run() -> Result<()> {
    let adapters = list_adapters();
    if adapters.is_empty() {
        println!("no GPU adapters found (set WGPU_BACKEND to try another backend); `--device cpu` always works");
        return Ok(());
    }
    println!("{} adapter(s), best first:", adapters.len());
    for (i, a) in adapters.iter().enumerate() {
        println!("[{i}] {}", a.name);
        println!(
            "    backend {}, type {}, driver {}",
            a.backend,
            a.device_type,
            if a.driver.is_empty() { "?" } else { &a.driver }
        );
        println!(
            "    max storage binding {} MiB, max buffer {} MiB, storage buffers per stage {}, invocations per workgroup {}, workgroups per dimension {}",
            a.max_storage_buffer_binding_size >> 20,
            a.max_buffer_size >> 20,
            a.max_storage_buffers_per_shader_stage,
            a.max_compute_invocations_per_workgroup,
            a.max_compute_workgroups_per_dimension
        );
    }
    let auto = adapters.iter().find(|a| a.is_hardware());
    match auto {
        Some(a) => println!("--device auto would use '{}'", a.name),
        None => println!(
            "--device auto would use the CPU path (no hardware GPU; a software adapter is slower than the CPU path)"
        ),
    }
    Ok(())
}
