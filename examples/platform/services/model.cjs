// model: a Nest microservice on the NATS transport (@nestjs/microservices 10, the major the
// platform's plan names). It never had an HTTP API: the other services reach it through
// their sidecars' `codec = "nestjs"` routes. It announces each key it hands out with a Nest
// event (emit), model.key.retrieved.
//
//   NEST_DIR=tests/node node examples/platform/services/model.cjs nats://127.0.0.1:4222
const path = require('path');
const req = require('module').createRequire(path.join(process.env.NEST_DIR, 'package.json'));
req('reflect-metadata');
const { Controller, Inject, Module } = req('@nestjs/common');
const { NestFactory } = req('@nestjs/core');
const { ClientsModule, MessagePattern, Payload, Transport } = req('@nestjs/microservices');

const url = process.argv[2];
const MODELS = { 'demo-1': { name: 'demo-1', temperature: 0.2, max_tokens: 256 } };

class ModelController {
  constructor(events) {
    this.events = events;
  }
  key(data) {
    this.events.emit('model.key.retrieved', { workflow_id: data.workflow_id, model: data.model });
    return { model: data.model, key_id: `key-${data.model}`, secret: 'sk-demo-not-a-real-key' };
  }
  config(data) {
    return MODELS[data.model] || MODELS['demo-1'];
  }
}
// Decorators applied by hand: plain JavaScript, no build step.
Inject('EVENTS')(ModelController, undefined, 0);
for (const [method, pattern] of [['key', 'model.key.requested'], ['config', 'model.config.requested']]) {
  MessagePattern(pattern)(ModelController.prototype, method, Object.getOwnPropertyDescriptor(ModelController.prototype, method));
  Payload()(ModelController.prototype, method, 0);
}
Controller()(ModelController);

class ModelModule {}
Module({
  imports: [ClientsModule.register([{ name: 'EVENTS', transport: Transport.NATS, options: { servers: [url] } }])],
  controllers: [ModelController],
})(ModelModule);

(async () => {
  const app = await NestFactory.createMicroservice(ModelModule, { transport: Transport.NATS, options: { servers: [url] }, logger: ['error', 'warn'] });
  await app.listen();
  console.log('model ready');
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
