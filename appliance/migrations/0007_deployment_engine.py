from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('appliance', '0006_nodes'),
    ]

    operations = [
        migrations.AddField(
            model_name='deployment',
            name='engine',
            field=models.CharField(choices=[('builtin', "builtin (transformers, this project's engine)"), ('vllm', 'vLLM'), ('sglang', 'SGLang'), ('auto', 'auto (vLLM where installed and CUDA is present, else builtin)')], default='builtin', max_length=16),
        ),
        migrations.AddField(
            model_name='deployment',
            name='engine_flags',
            field=models.JSONField(blank=True, default=list),
        ),
    ]
