// Headless Chromium for the page's harnesses (browser.mjs, measure.mjs).
//
// Contract: `launch(WEBGPU)` starts $CHROMIUM (else Debian's /usr/bin/chromium) with WebGPU on
// its software adapter, SwiftShader; `launch(NO_WEBGPU)` without WebGPU at all. Both run without
// a sandbox (root in CI) and without Chromium's background connections, which a closed network
// refuses.

import { chromium } from 'playwright-core';

export const WEBGPU = ['--enable-unsafe-webgpu', '--enable-features=Vulkan', '--use-webgpu-adapter=swiftshader'];
export const NO_WEBGPU = ['--disable-blink-features=WebGPU'];

const QUIET = ['--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--no-first-run', '--disable-quic'];

export function launch(webgpu) {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [...QUIET, ...webgpu],
  });
}
