//! kubefim's kernel-side programs. Empty until the watch-mode work (issue 3) adds the
//! tracepoint hooks; it sits outside the workspace because it only builds for the BPF target.
#![no_std]
#![no_main]

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
