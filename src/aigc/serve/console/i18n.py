"""The console's words in English and Chinese. A page asks ``t(lang, key)``; a key with no Chinese falls back to English.

The language comes from the ``aigc_lang`` cookie (the switch in the header) or else the browser's Accept-Language."""
from __future__ import annotations

LANGS = ("en", "zh")

EN = {
    "brand": "AIGC console", "sign_in": "Sign in", "sign_out": "Sign out", "api_key": "API key", "or": "or",
    "email": "E-mail", "password": "Password", "operator_token": "an API key, or the operator token",
    "sign_in_help": "Sign in with one of your organisation's API keys, or with your e-mail and password.",
    "bad_sign_in": "That key, e-mail or password is not right.", "expired": "Your session has ended: sign in again.",
    "playground": "Playground", "models": "Models", "training": "Training", "usage": "Usage & billing",
    "keys": "Keys & users", "review": "Review queue", "audit": "Audit", "language": "Language",
    "chat": "Chat", "completion": "Completion", "image": "Image", "music": "Music", "video": "Video",
    "model": "Model", "prompt": "Prompt", "system": "System prompt", "temperature": "Temperature", "top_p": "Top-p",
    "max_tokens": "Max tokens", "seed": "Seed", "generate": "Generate", "send": "Send", "template": "Template",
    "no_template": "(free prompt)", "caption": "Caption or class", "steps": "Steps", "guidance": "Guidance",
    "size": "Size", "key": "Key", "bars": "Bars", "tempo": "Tempo (BPM)", "duration": "Seconds", "fps": "Frames per second",
    "result": "Result", "price": "Price", "compute_cost": "Compute cost", "generation": "Generation",
    "watermark": "Watermark", "c2pa": "C2PA", "explanation": "Explanation", "status": "Status", "progress": "Progress",
    "kind": "Kind", "version": "Version", "owner": "Owner", "created": "Created", "details": "Details",
    "dataset": "Dataset", "eval": "Evaluation", "loss": "Loss", "samples": "Samples", "steps_col": "Step",
    "records": "Records", "kept": "Kept", "dropped": "Dropped", "reason": "Reason", "examples": "Examples", "pii": "Personal data found",
    "upload": "Upload a dataset (JSONL)", "upload_btn": "Upload", "files": "Datasets", "jobs": "Fine-tuning jobs",
    "new_job": "Start a fine-tuning job", "base_model": "Base model", "training_file": "Training file",
    "validation_file": "Validation file", "none": "(none)", "epochs": "Epochs", "batch_size": "Batch size",
    "lr_mult": "Learning-rate multiplier", "suffix": "Suffix", "method": "Method", "finetuning_type": "Weights",
    "start": "Start", "cancel": "Cancel", "delete": "Delete", "open_playground": "Open in the playground",
    "events": "Events", "trained_tokens": "Trained tokens", "estimated_tokens": "Tokens per epoch",
    "result_model": "Resulting model", "train_loss": "training loss", "valid_loss": "validation loss",
    "requests": "Requests", "units": "Units", "revenue": "Revenue", "cost": "Compute cost", "margin": "Margin",
    "by_day": "By day", "by_model": "By model", "by_key": "By key", "plan": "Plan", "quota_left": "Quota left",
    "credit_left": "Credit left", "spent": "Spent this period", "export_csv": "Export CSV", "statement": "Monthly statement",
    "month": "Month", "day": "Day", "total": "Total", "tokens_in": "Input tokens", "tokens_out": "Output tokens",
    "images": "Images", "seconds": "Seconds",
    "create_key": "Create a key", "name": "Name", "allowed_models": "Restrict to models", "all_models": "every model",
    "expires": "Expires", "never": "never", "revoke": "Revoke", "revoked": "revoked", "active": "active",
    "shown_once": "Copy this key now: it is shown only once.", "users": "Users", "add_user": "Add a user",
    "role": "Role", "set_password": "Set password", "prefix": "Prefix", "user": "User", "actions": "Actions",
    "complaints": "Complaints", "evidence": "Evidence", "decision": "Decision", "note": "Note", "dismiss": "Dismiss",
    "takedown": "Take down", "revoke_key": "Revoke the key", "queue_empty": "Nothing waiting for review.",
    "open": "open", "contact": "Contact", "matched": "Matched generation",
    "chain": "Audit chain", "verify": "Verify the chain", "head": "Head", "entries": "Entries", "valid": "valid",
    "broken": "BROKEN", "tenant": "Tenant", "actor": "Actor", "action": "Action", "subject": "Subject", "filter": "Filter",
    "when": "When", "data": "Data", "forbidden": "You may not open this page.", "not_found": "Nothing here.",
    "no_rows": "Nothing yet.", "signed_in_as": "Signed in as", "tenants": "Tenants",
    "working": "Working…", "done": "Done", "error": "Error", "interpolate": "Interpolate to", "n_images": "Images",
    "stream_note": "Answers stream in as they are generated.", "preview": "Preview",
    "api_docs": "API reference", "st_open": "Open", "st_flagged": "Flagged by moderation", "st_taken_down": "Taken down",
    "st_dismissed": "Dismissed", "st_key_revoked": "Key revoked", "st_all": "All",
    "flagged_help": "Outputs that moderation flagged, redacted or blocked. Put one in the queue to decide on it.",
    "to_queue": "Put in the queue", "in_queue": "in the queue", "no_models": "No model of this kind is served here yet.", "scenes": "Scenes (interpolated between)",
    "csrf_failed": "This form was not sent from the console (its CSRF token is missing or wrong): reload the page.",
}

ZH = {
    "brand": "AIGC 控制台", "sign_in": "登录", "sign_out": "退出", "api_key": "API 密钥", "or": "或",
    "email": "电子邮件", "password": "密码", "operator_token": "API 密钥或运营方令牌",
    "sign_in_help": "使用贵组织的 API 密钥登录，或使用电子邮件和密码登录。",
    "bad_sign_in": "密钥、电子邮件或密码不正确。", "expired": "会话已结束，请重新登录。",
    "playground": "试用台", "models": "模型", "training": "训练", "usage": "用量与账单",
    "keys": "密钥与用户", "review": "审核队列", "audit": "审计", "language": "语言",
    "chat": "对话", "completion": "续写", "image": "图像", "music": "音乐", "video": "视频",
    "model": "模型", "prompt": "提示词", "system": "系统提示词", "temperature": "温度", "top_p": "Top-p",
    "max_tokens": "最大词元数", "seed": "随机种子", "generate": "生成", "send": "发送", "template": "模板",
    "no_template": "（自由提示词）", "caption": "描述或类别", "steps": "步数", "guidance": "引导强度",
    "size": "尺寸", "key": "调性", "bars": "小节数", "tempo": "速度（BPM）", "duration": "秒数", "fps": "帧率",
    "result": "结果", "price": "价格", "compute_cost": "计算成本", "generation": "生成记录",
    "watermark": "水印", "c2pa": "C2PA", "explanation": "生成说明", "status": "状态", "progress": "进度",
    "kind": "类型", "version": "版本", "owner": "所有者", "created": "创建时间", "details": "详情",
    "dataset": "数据集", "eval": "评测", "loss": "损失", "samples": "样例", "steps_col": "步",
    "records": "记录", "kept": "保留", "dropped": "丢弃", "reason": "原因", "examples": "示例", "pii": "发现的个人信息",
    "upload": "上传数据集（JSONL）", "upload_btn": "上传", "files": "数据集", "jobs": "微调任务",
    "new_job": "开始微调", "base_model": "基础模型", "training_file": "训练文件",
    "validation_file": "验证文件", "none": "（无）", "epochs": "轮数", "batch_size": "批大小",
    "lr_mult": "学习率倍数", "suffix": "后缀", "method": "方法", "finetuning_type": "权重",
    "start": "开始", "cancel": "取消", "delete": "删除", "open_playground": "在试用台中打开",
    "events": "事件", "trained_tokens": "已训练词元", "estimated_tokens": "每轮词元数",
    "result_model": "生成的模型", "train_loss": "训练损失", "valid_loss": "验证损失",
    "requests": "请求数", "units": "用量", "revenue": "收入", "cost": "计算成本", "margin": "毛利",
    "by_day": "按天", "by_model": "按模型", "by_key": "按密钥", "plan": "套餐", "quota_left": "剩余额度",
    "credit_left": "剩余余额", "spent": "本期花费", "export_csv": "导出 CSV", "statement": "月度账单",
    "month": "月份", "day": "日期", "total": "合计", "tokens_in": "输入词元", "tokens_out": "输出词元",
    "images": "图像", "seconds": "秒",
    "create_key": "创建密钥", "name": "名称", "allowed_models": "限定模型", "all_models": "全部模型",
    "expires": "到期", "never": "永不", "revoke": "吊销", "revoked": "已吊销", "active": "有效",
    "shown_once": "请立即复制此密钥：它只显示这一次。", "users": "用户", "add_user": "添加用户",
    "role": "角色", "set_password": "设置密码", "prefix": "前缀", "user": "用户", "actions": "操作",
    "complaints": "投诉", "evidence": "证据", "decision": "处理", "note": "备注", "dismiss": "驳回",
    "takedown": "下架", "revoke_key": "吊销密钥", "queue_empty": "没有待审核的内容。",
    "open": "待处理", "contact": "联系方式", "matched": "对应的生成记录",
    "chain": "审计链", "verify": "校验审计链", "head": "链头", "entries": "条目", "valid": "完整",
    "broken": "已损坏", "tenant": "租户", "actor": "操作者", "action": "动作", "subject": "对象", "filter": "筛选",
    "when": "时间", "data": "数据", "forbidden": "您无权打开此页面。", "not_found": "这里什么也没有。",
    "no_rows": "暂无数据。", "signed_in_as": "当前用户", "tenants": "租户",
    "working": "处理中…", "done": "完成", "error": "错误", "interpolate": "插值到", "n_images": "图像数",
    "stream_note": "回答会边生成边显示。", "preview": "预览",
    "api_docs": "API 文档", "st_open": "待处理", "st_flagged": "审核标记", "st_taken_down": "已下架",
    "st_dismissed": "已驳回", "st_key_revoked": "已吊销密钥", "st_all": "全部",
    "flagged_help": "被内容审核标记、打码或拦截的输出。放入队列后即可处理。",
    "to_queue": "放入队列", "in_queue": "已在队列中", "no_models": "这里还没有这类模型。", "scenes": "场景数（场景之间插值）",
    "csrf_failed": "此表单不是从控制台提交的（CSRF 令牌缺失或错误），请刷新页面。",
}

TABLES = {"en": EN, "zh": ZH}


def pick(cookie: str | None, accept_language: str | None) -> str:
    """The cookie's choice, else the first of the browser's languages that the console speaks, else English."""
    if cookie in LANGS:
        return cookie
    for part in (accept_language or "").split(","):
        code = part.split(";")[0].strip().lower()[:2]
        if code in LANGS:
            return code
    return "en"


def t(lang: str, key: str) -> str:
    return TABLES.get(lang, EN).get(key) or EN.get(key, key)
