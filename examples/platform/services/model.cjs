// model: a Nest microservice on the NATS transport (@nestjs/microservices 10, the major the
// platform's plan names). It never had an HTTP API: the other services reach it through
// their sidecars' `codec = "nestjs"` routes. It announces each key it hands out,
// model.key.retrieved, through its own sidecar (routes/model.toml: an outbound publish
// route with the event's contract), a plain HTTP POST to NATSBRIDGE_URL (or EGRESS_URL).
//
//   natsbridge dev --config examples/platform/routes/model.toml -- \
//     env NEST_DIR=tests/node node examples/platform/services/model.cjs nats://127.0.0.1:4222
const http = require('http');
const path = require('path');
const req = require('module').createRequire(path.join(process.env.NEST_DIR, 'package.json'));
req('reflect-metadata');
const { Controller, Module } = req('@nestjs/common');
const { NestFactory } = req('@nestjs/core');
const { MessagePattern, Payload, Transport } = req('@nestjs/microservices');

const url = process.argv[2];
const egress = process.env.EGRESS_URL || process.env.NATSBRIDGE_URL;
const MODELS = { 'demo-1': { name: 'demo-1', temperature: 0.2, max_tokens: 256 } };

// POST to the sidecar; resolves with the status (a notification's failure is logged, never
// the key request's failure).
function announce(route, body) {
  return new Promise((resolve) => {
    const data = JSON.stringify(body);
    const r = http.request(`${egress}${route}`, { method: 'POST', headers: { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(data) } }, (res) => {
      res.resume();
      if (res.statusCode >= 300) console.error(`model: ${route}: ${res.statusCode}`);
      res.on('end', () => resolve(res.statusCode));
    });
    r.on('error', (e) => {
      console.error(`model: ${route}: ${e.message}`);
      resolve(0);
    });
    r.end(data);
  });
}

class ModelController {
  async key(data) {
    await announce('/events/key-retrieved', { workflow_id: data.workflow_id, model: data.model });
    return { model: data.model, key_id: `key-${data.model}`, secret: 'sk-demo-not-a-real-key' };
  }
  config(data) {
    return MODELS[data.model] || MODELS['demo-1'];
  }
}
// Decorators applied by hand: plain JavaScript, no build step.
for (const [method, pattern] of [['key', 'model.key.requested'], ['config', 'model.config.requested']]) {
  MessagePattern(pattern)(ModelController.prototype, method, Object.getOwnPropertyDescriptor(ModelController.prototype, method));
  Payload()(ModelController.prototype, method, 0);
}
Controller()(ModelController);

class ModelModule {}
Module({ controllers: [ModelController] })(ModelModule);

(async () => {
  const app = await NestFactory.createMicroservice(ModelModule, { transport: Transport.NATS, options: { servers: [url] }, logger: ['error', 'warn'] });
  await app.listen();
  console.log('model ready');
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
