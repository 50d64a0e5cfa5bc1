#!/usr/bin/env node
// A local Hyperswarm DHT testnet and a JS hyperswarm peer for multifeed's DHT test
// (driven by tests/dht.rs). Pinned by package-lock.json.
//
//   node swarm.js testnet <extra-nodes>
//     Starts a DHT bootstrapper on 127.0.0.1 (`DHT.bootstrapper`, on a free port) and <extra-nodes>
//     more DHT nodes joined through it, prints `BOOTSTRAP 127.0.0.1:<port>`, and runs
//     until killed (or 120 s).
//
//   node swarm.js peer <host:port> <topic-hex> <count> [server]
//     Joins <topic-hex> (announce and look up; with `server` only announce, so it
//     never dials) through the bootstrap node, prints
//     `KEY <own public key hex>`, then `PEER <remote public key hex> <ms>` for each
//     new remote key that connects (ms since start), and exits 0 once <count>
//     distinct keys connected (or 1 after 120 s).
//
//   node swarm.js holepunch <bootstrap host:port> <target host:port>
//     Sends one PEER_HOLEPUNCH request (hyperdht command 1, which the Rust hyperdht
//     0.1.1 answers with `todo!()`) to the DHT node at <target>, prints `SENT` and
//     exits 0 whether or not an answer comes.
//
// Only stdout lines starting with a keyword are protocol; stderr is diagnostics.

'use strict'

const dgram = require('dgram')
const DHT = require('hyperdht')
const Hyperswarm = require('hyperswarm')

const OVERALL_TIMEOUT_MS = 120_000
const HOST = '127.0.0.1'

function fail(message) {
  process.stderr.write(`swarm.js: ${message}\n`)
  process.exit(1)
}

process.on('uncaughtException', (err) => fail(`uncaught exception: ${err && err.stack}`))
process.on('unhandledRejection', (err) => fail(`unhandled rejection: ${err && err.stack}`))
setTimeout(() => fail(`timed out after ${OVERALL_TIMEOUT_MS} ms`), OVERALL_TIMEOUT_MS).unref()

function out(line) {
  process.stdout.write(line + '\n')
}

// A bootstrapper's id comes from its address, so it needs its port up front: the
// kernel picks a free one for a moment's socket.
function freeUdpPort() {
  return new Promise((resolve, reject) => {
    const socket = dgram.createSocket('udp4')
    socket.on('error', reject)
    socket.bind(0, HOST, () => {
      const { port } = socket.address()
      socket.close(() => resolve(port))
    })
  })
}

async function testnet(extra) {
  const bootstrapper = DHT.bootstrapper(await freeUdpPort(), HOST)
  await bootstrapper.ready()
  const { port } = bootstrapper.address()
  const bootstrap = [`${HOST}:${port}`]
  const nodes = [bootstrapper]
  for (let i = 0; i < extra; i++) {
    const node = new DHT({ bootstrap, ephemeral: false, firewalled: false, host: HOST })
    await node.ready()
    nodes.push(node)
  }
  out(`BOOTSTRAP ${HOST}:${port}`)
  // Keeps running: the test kills us.
  setInterval(() => {}, 1000)
}

async function peer(bootstrap, topicHex, count, serverOnly) {
  const started = Date.now()
  const topic = Buffer.from(topicHex, 'hex')
  if (topic.length !== 32) fail(`bad topic: ${topicHex}`)
  const swarm = new Hyperswarm({ bootstrap: [bootstrap] })
  const seen = new Set()
  swarm.on('connection', (conn, info) => {
    conn.on('error', (err) => process.stderr.write(`swarm.js: connection error: ${err.message}\n`))
    conn.on('data', () => {})
    const key = info.publicKey.toString('hex')
    if (seen.has(key)) return
    seen.add(key)
    out(`PEER ${key} ${Date.now() - started}`)
    if (seen.size >= count) {
      // Let the last connection settle, then leave.
      setTimeout(() => swarm.destroy().then(() => process.exit(0)), 500)
    }
  })
  out(`KEY ${swarm.keyPair.publicKey.toString('hex')}`)
  await swarm.join(topic, { server: true, client: !serverOnly }).flushed()
  process.stderr.write(`swarm.js: announced after ${Date.now() - started} ms\n`)
}

async function holepunch(bootstrap, target) {
  const [host, port] = target.split(':')
  const node = new DHT({ bootstrap: [bootstrap], ephemeral: true })
  await node.ready()
  const request = node.request(
    { command: 1, target: Buffer.alloc(32, 7), value: Buffer.alloc(8) },
    { host, port: Number(port) },
    { retry: false }
  )
  out('SENT')
  try {
    await request
  } catch (err) {
    process.stderr.write(`swarm.js: no answer to the holepunch request: ${err.message}\n`)
  }
  await node.destroy()
  process.exit(0)
}

const [cmd, ...args] = process.argv.slice(2)
if (cmd === 'testnet') {
  testnet(Number(args[0] || 0))
} else if (cmd === 'peer') {
  const count = Number(args[2])
  if (!Number.isSafeInteger(count) || count < 1) fail(`bad count: ${args[2]}`)
  peer(args[0], args[1], count, args[3] === 'server')
} else if (cmd === 'holepunch') {
  holepunch(args[0], args[1])
} else {
  fail(`usage: swarm.js testnet <extra-nodes> | peer <host:port> <topic-hex> <count> | holepunch <host:port> <host:port>`)
}
